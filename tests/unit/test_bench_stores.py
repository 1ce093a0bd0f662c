"""bench.stores copy: stores copied by name, only the entries the destination lacks, one part each."""

import torch

from bench.stores import main
from meg.fit import WeightStore


def _add(store: WeightStore, keys: list[str], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    store.add(keys, {"z": torch.randn(len(keys), 4, generator=g), "steps": torch.arange(len(keys))})


def _parts(root):
    return sorted(root.glob("part-*.safetensors"))


def test_copy_takes_what_is_missing_and_reads_back_equal(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    a = WeightStore(src / "settings-a")
    _add(a, ["e0", "e1"], 0)
    _add(a, ["e2"], 1)
    _add(WeightStore(src / "settings-b"), ["e0"], 2)

    assert main(["copy", str(src), str(dst)]) == 0
    assert f"{dst / 'settings-a'}: 3 entries copied" in capsys.readouterr().out
    assert len(_parts(dst / "settings-a")) == 1  # two parts became one
    _add(a, ["e3"], 3)
    assert main(["copy", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert f"{dst / 'settings-a'}: 1 entries copied" in out and f"{dst / 'settings-b'}: 0 entries copied" in out
    assert len(_parts(dst / "settings-a")) == 2  # the new entry alone, not the store again

    for name in ("settings-a", "settings-b"):
        want, got = WeightStore(src / name).load(), WeightStore(dst / name).load()
        assert sorted(got) == sorted(want)
        for key in want:
            assert all(torch.equal(got[key][t], want[key][t]) for t in ("z", "steps"))


def test_a_missing_source_or_mixed_parts_are_refused(tmp_path, capsys):
    assert main(["copy", str(tmp_path / "nowhere"), str(tmp_path / "dst")]) == 2
    assert "nowhere: no such directory of stores" in capsys.readouterr().err

    mixed = WeightStore(tmp_path / "src" / "s")
    _add(mixed, ["e0"], 0)
    mixed.add(["e1"], {"z": torch.zeros(1, 4)})  # no "steps"
    assert main(["copy", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert "hold different tensors" in capsys.readouterr().err
    assert not (tmp_path / "dst" / "s").exists()  # nothing half-written
