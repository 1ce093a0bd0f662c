"""Throughput of the HTTP service: the edited model against a base-model service, 32 concurrent clients.

    python -m bench.throughput --bundle /tmp/meg-bench/smollm2-cf256 --clients 32 --rounds 3 --out OUT.json

Two services run side by side as subprocesses, ``meg serve BUNDLE`` and ``meg serve BUNDLE --base``
(the same server, batching and answer code, serving the unedited base model), each with
``--threads`` torch threads; only one is under load at a time. A round: ``--clients`` threads start
together and each sends ``--requests`` requests of one question, one after the other; throughput is
questions answered per second of the round's wall time. Rounds alternate ABBA (edited, base, base,
edited, ...) so that drifting load on a shared machine cancels in the ratio; the reported ratio is the
median over rounds of edited / base throughput in adjacent rounds. Each round also records the CPU
time the service process used, and so questions per CPU second: on a machine shared with other
jobs, that ratio measures the work per question even when waiting for a core slows both services.

Questions mix the bundle's edit prompts, their CounterFact paraphrases and locality prompts in equal
parts (routed and unrelated traffic), shuffled with a fixed seed, the same sequence for both services.
Answers stop at their first newline (as served), so a pass lasts as long as its longest answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=3, help="requests per client per round")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds per service (even: ABBA order)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each service")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """``meg serve`` in a subprocess; stopped (by its own pid) on exit."""

    def __init__(self, bundle: Path, base: bool, threads: int, max_wait_ms: float, log: Path):
        self.port = free_port()
        cmd = [sys.executable, "-m", "meg.cli", "serve", str(bundle), "--port", str(self.port), "--threads",
               str(threads), "--max-wait-ms", str(max_wait_ms)] + (["--base"] if base else [])
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}; see {self.log.name}")
            try:
                status, _ = request(self.port, "GET", "/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("service did not start in time")

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) the service process has used so far."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def request(port: int, method: str, path: str, body: dict | None = None, conn=None) -> tuple[int, dict]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        if own:
            conn.close()


def question_mix(bundle: Path) -> list[str]:
    from meg.facts import load_benchmark

    manifest = json.loads((bundle / "manifest.json").read_text())
    edits = manifest["info"].get("edits") or []
    by_id = {e.id: e for e in load_benchmark("counterfact", "edit")}
    out = []
    for e in edits:
        cf = by_id.get(e["id"])
        out.append(e["prompt"])
        if cf and cf.paraphrases:
            out.append(cf.paraphrases[0])
        if cf and cf.locality:
            out.append(cf.locality[0].prompt)
    # Shuffled (fixed seed): in list order, the k-th request of every client would be the same kind of
    # question, and a pass of only edited facts (short answers) ends early, flattering the edited service.
    random.Random(0).shuffle(out)
    return out


def run_round(port: int, clients: int, per_client: int, questions: list[str], offset: int) -> dict:
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        barrier.wait()
        for k in range(per_client):
            q = questions[(offset + c * per_client + k) % len(questions)]
            t0 = time.perf_counter()
            try:
                status, body = request(port, "POST", "/v1/answer", {"questions": [q]}, conn)
            except OSError as e:
                status, body = 0, {"error": str(e)}
            with lock:
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failures.append(f"{status}: {body}")
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"questions": len(lat), "failures": failures[:5], "n_failures": len(failures), "seconds": wall,
            "qps": len(lat) / wall, "latency_p50": lat[len(lat) // 2] if lat else None,
            "latency_p95": lat[int(0.95 * (len(lat) - 1))] if lat else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated benchmark still stops its services
    questions = question_mix(args.bundle)
    logs = (args.out.parent if args.out else Path.cwd())
    logs.mkdir(parents=True, exist_ok=True)
    services = {"edited": Service(args.bundle, False, args.threads, args.max_wait_ms, logs / "throughput_edited.log"),
                "base": Service(args.bundle, True, args.threads, args.max_wait_ms, logs / "throughput_base.log")}
    rounds: dict[str, list[dict]] = {"edited": [], "base": []}
    try:
        for s in services.values():
            s.wait_ready()
        print(f"bench.throughput: {len(questions)} questions, {args.clients} clients x {args.requests} requests per "
              f"round, {args.rounds} rounds per service, {args.threads} threads per service", flush=True)
        for name, s in services.items():  # warm-up: first-call costs, one small round
            run_round(s.port, min(4, args.clients), 1, questions, 0)
        order = []
        for r in range(args.rounds):
            order += ["edited", "base"] if r % 2 == 0 else ["base", "edited"]
        for i, name in enumerate(order):
            before = request(services[name].port, "GET", "/health")[1]["batching"]
            cpu0 = services[name].cpu_seconds()
            res = run_round(services[name].port, args.clients, args.requests, questions, i * 7)
            res["server_cpu_seconds"] = services[name].cpu_seconds() - cpu0
            res["questions_per_cpu_second"] = res["questions"] / res["server_cpu_seconds"]
            after = request(services[name].port, "GET", "/health")[1]["batching"]
            passes = after["batches"] - before["batches"]
            res["mean_batch_size"] = (after["questions"] - before["questions"]) / passes if passes else 0.0
            rounds[name].append(res)
            print(f"round {i + 1} {name}: {res['qps']:.3f} questions/s ({res['questions_per_cpu_second']:.3f} per "
                  f"server CPU second), p50 {res['latency_p50']:.1f} s, p95 {res['latency_p95']:.1f} s, "
                  f"mean batch {res['mean_batch_size']:.1f}, failures {res['n_failures']}", flush=True)
    finally:
        for s in services.values():
            s.close()
    ratios = [e["qps"] / b["qps"] for e, b in zip(rounds["edited"], rounds["base"])]
    cpu_ratios = [e["questions_per_cpu_second"] / b["questions_per_cpu_second"]
                  for e, b in zip(rounds["edited"], rounds["base"])]
    result = {
        "bundle": str(args.bundle), "clients": args.clients, "requests_per_client": args.requests,
        "threads": args.threads, "rounds": rounds,
        "qps_median": {k: statistics.median(r["qps"] for r in v) for k, v in rounds.items()},
        "ratio_edited_over_base": statistics.median(ratios), "ratios": ratios,
        "cpu_ratio_edited_over_base": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios,
    }
    print(f"throughput edited/base = {result['ratio_edited_over_base']:.3f} (rounds: "
          + ", ".join(f"{r:.3f}" for r in ratios) + "); per server CPU second: "
          f"{result['cpu_ratio_edited_over_base']:.3f} (" + ", ".join(f"{r:.3f}" for r in cpu_ratios) + ")",
          flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
