"""Benchmark: ``reft-rs serve`` under concurrent streaming clients.

SmolLM2-135M-Instruct, float32 and the package's Q4_1 GGUF. For 1, 8 and 32
concurrent clients (threads of this process, each with the ``openai``
client, ``stream=True``), every client asks for a 64-token reply (greedy,
end-of-sequence ignored) to its own ~32-token prompt:

* (a) every request on the base model;
* (b) requests spread over 8 different LoReFT r4 adapters (4 layers, l2).

Per row: aggregate tokens per second (all replies' tokens over the wall
time), time to first token and the gap between tokens (p50 and p99). The
baselines, from the same run: (b) against (a) at each concurrency (target
>= 0.9), and at 32 clients the server against the offline
``Engine.generate_ids`` at batch 32 on the same prompts (target >= 0.8).
When ``llama-cpp-python[server]`` is installed, its server on the same GGUF
file is measured beside it (base model only: it has no ReFT).

The server runs as ``reft-rs serve`` in a child process on 127.0.0.1.

    python benches/bench_serve.py [--threads 2] [--clients 1 8 32] [--rounds 1]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

NEW = 64
ADAPTERS = 8
WORDS = (
    "the history of the roman empire spans many centuries beginning with the founding of the city and ending "
    "with the fall of constantinople its legacy shaped law language architecture and religion across europe "
    "and the mediterranean and historians still debate the causes of its decline from economic troubles"
).split()


def prompt(i: int) -> str:
    """A distinct prompt of about 32 tokens."""
    start = (7 * i) % (len(WORDS) - 24)
    return f"Request {i}: " + " ".join(WORDS[start : start + 24])


def make_adapters(root: str) -> list[str]:
    import torch

    import reft_rs
    from reft_rs import pretrained

    paths = []
    for seed in range(ADAPTERS):
        model, _ = pretrained.load_smollm2()
        torch.manual_seed(seed)
        config = reft_rs.ReftConfig.for_layers([3, 9, 18, 24], low_rank_dimension=4, positions="l2")
        reft_model = reft_rs.get_reft_model(model, config)
        with torch.no_grad():
            for intervention in reft_model.interventions:
                intervention.weight.mul_(4)
        path = os.path.join(root, f"loreft{seed}")
        reft_model.save_pretrained(path)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    command: list[str], port: int, env: dict[str, str], timeout: float = 120
) -> subprocess.Popen:
    import openai

    # The log goes to a file: llama.cpp writes more while loading than a
    # pipe holds, and an unread pipe would stop it there.
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    deadline = time.monotonic() + timeout
    while True:
        try:
            api.models.list()
            return process
        except openai.APIConnectionError:
            if process.poll() is not None:
                log.seek(0)
                raise SystemExit(f"the server failed: {log.read()[-2000:]}") from None
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit("the server did not start") from None
            time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


def one_request(api, model: str, text: str, extra: dict) -> tuple[float, list[float], int]:
    """(time to first token, gaps between tokens, tokens) of one streamed reply."""
    start = time.perf_counter()
    stamps = []
    tokens = 0
    for chunk in api.completions.create(
        model=model,
        prompt=text,
        max_tokens=NEW,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    ):
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    tokens = tokens or len(stamps)
    ttft = stamps[0] - start if stamps else float("nan")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return ttft, gaps, tokens


def load(port: int, models: list[str], clients: int, rounds: int, extra: dict) -> dict[str, float]:
    import openai

    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    def client(c: int) -> list[tuple[float, list[float], int]]:
        return [
            one_request(api, models[(c + r) % len(models)], prompt(c * rounds + r), extra)
            for r in range(rounds)
        ]

    one_request(api, models[0], prompt(999), extra)  # warm up
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    gaps = sorted(g for r in results for g in r[1])
    tokens = sum(r[2] for r in results)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "tok_s": tokens / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": pct(ttfts, 0.99),
        "gap_p50": pct(gaps, 0.5),
        "gap_p99": pct(gaps, 0.99),
        "tokens": tokens,
    }


def offline(path: str, threads: int, batch: int, env: dict[str, str]) -> float:
    """tok/s of Engine.generate_ids at ``batch`` on the benchmark's prompts."""
    code = f"""
import time, reft_rs
engine = reft_rs.Engine({path!r}, threads={threads})
prompts = [engine.encode(t) for t in {[prompt(i) for i in range(batch)]!r}]
engine.generate_ids(prompts[:2], 4, ignore_eos=True)
start = time.perf_counter()
out = engine.generate_ids(prompts, {NEW}, ignore_eos=True)
print(sum(map(len, out)) / (time.perf_counter() - start))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=1, help="requests per client, one after another")
    parser.add_argument("--models", nargs="+", default=["f32", "q4_1"], choices=["f32", "q4_1"])
    args = parser.parse_args()

    from reft_rs import pretrained

    paths = {"f32": str(pretrained.smollm2_path()), "q4_1": str(pretrained.smollm2_gguf())}
    env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads)}
    has_llamacpp = importlib.util.find_spec("llama_cpp") is not None
    print(
        f"SmolLM2-135M, {NEW}-token streamed replies to ~32-token prompts, {args.threads} threads, "
        f"{args.rounds} request(s) per client"
    )
    header = f"{'':26}{'clients':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'gap p50':>9}{'gap p99':>9}"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-c", f"import runpy; runpy.run_path({__file__!r})['make_adapters']({tmp!r})"],
            check=True,
            capture_output=True,
        )
        adapters = [os.path.join(tmp, f"loreft{i}") for i in range(ADAPTERS)]
        summary = []
        for kind in args.models:
            port = free_port()
            command = [sys.executable, "-m", "reft_rs", "serve", "--model", paths[kind], "--port", str(port)]
            command += ["--model-name", "base", "--threads", str(args.threads), "--log-level", "warning"]
            command += ["--max-batch", str(max(args.clients))]
            for i, path in enumerate(adapters):
                command += ["--adapter", f"a{i}={path}"]
            print(f"\n{kind}\n{header}")
            server = start_server(command, port, env)
            rows = {}
            try:
                for clients in args.clients:
                    for scenario, models in (
                        ("base model", ["base"]),
                        ("8 adapters", [f"a{i}" for i in range(ADAPTERS)]),
                    ):
                        row = load(port, models, clients, args.rounds, {"ignore_eos": True})
                        rows[scenario, clients] = row
                        print(
                            f"{'reft-rs ' + scenario:26}{clients:>8}{row['tok_s']:>9.1f}{row['ttft_p50']:>10.3f}"
                            f"{row['ttft_p99']:>10.3f}{row['gap_p50'] * 1000:>7.1f}ms{row['gap_p99'] * 1000:>7.1f}ms",
                            flush=True,
                        )
            finally:
                stop_server(server)
            if has_llamacpp and kind == "q4_1":
                port = free_port()
                command = [
                    sys.executable,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    paths[kind],
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ]
                command += ["--n_threads", str(args.threads), "--model_alias", "base", "--n_ctx", "2048"]
                server = start_server(command, port, env)
                try:
                    for clients in args.clients:
                        row = load(port, ["base"], clients, args.rounds, {})
                        rows["llama.cpp", clients] = row
                        print(
                            f"{'llama.cpp server':26}{clients:>8}{row['tok_s']:>9.1f}{row['ttft_p50']:>10.3f}"
                            f"{row['ttft_p99']:>10.3f}{row['gap_p50'] * 1000:>7.1f}ms{row['gap_p99'] * 1000:>7.1f}ms",
                            flush=True,
                        )
                finally:
                    stop_server(server)
            top = max(args.clients)
            batch = offline(paths[kind], args.threads, top, env)
            print(f"{'offline generate_ids':26}{top:>8}{batch:>9.1f}")
            for clients in args.clients:
                ratio = rows["8 adapters", clients]["tok_s"] / rows["base model", clients]["tok_s"]
                summary.append(
                    f"  {kind}: {clients} clients: 8 adapters {ratio:.2f}x base model (target >= 0.9)"
                )
            ratio = rows["base model", top]["tok_s"] / batch
            summary.append(
                f"  {kind}: {top} clients: server {ratio:.2f}x offline batch {top} (target >= 0.8)"
            )
            if ("llama.cpp", top) in rows:
                ratio = rows["base model", top]["tok_s"] / rows["llama.cpp", top]["tok_s"]
                summary.append(f"  {kind}: {top} clients: reft-rs {ratio:.2f}x llama.cpp server")
        if not has_llamacpp:
            summary.append("  llama.cpp: llama-cpp-python[server] is not installed; not measured")
        print("\nratios (same run):")
        print("\n".join(summary))


if __name__ == "__main__":
    main()
