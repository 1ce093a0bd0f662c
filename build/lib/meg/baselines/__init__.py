"""Other editors behind the same `meg.evaluate.Editor` interface, for side-by-side comparison."""
