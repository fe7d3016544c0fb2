"""Benchmark: ``reft-rs serve`` against llama.cpp's ``llama-server``.

SmolLM2-135M-Instruct as the package's Q4_1 GGUF and as a Q4_K_M file made
with ``llama-quantize`` (``llamacpp_build.py``). For 1, 8 and 32 concurrent
clients (threads of this process, each with the ``openai`` client,
``stream=True``), each client sends ``--rounds`` requests one after
another, each a 64-token reply (greedy, end of sequence ignored) to its own
~32-token prompt. Every reply on both sides must hold exactly 64 tokens
(the script stops otherwise), so both do the same work.

* reft-rs serve, (a) the base model, (b) requests spread over 8 different
  LoReFT r4 adapters (4 layers, l2), (c) requests spread over 8 different
  llama.cpp control vectors loaded as adapters (per request);
* llama-server (built from the ``llama-cpp-python`` sdist with this CPU's
  flags, ``--parallel N --cont-batching -t 2``, restarted for each N),
  (a) the base model, (c) one global ``--control-vector`` (llama.cpp applies
  one vector to every request).

Per row: aggregate tokens per second (all replies' tokens over the wall
time), time to first token and the gap between tokens (p50 and p99).
Targets, from the same run: reft-rs with 8 adapters >= 1.0x llama-server on
the base model and >= 1.0x llama-server with its control vector, and time
to first token p50 <= llama-server's, at every concurrency.

Both servers run as child processes on 127.0.0.1.

    python benches/bench_serve.py [--threads 2] [--clients 1 8 32] [--rounds 2] [--files q4_1 q4_k_m]
"""

from __future__ import annotations

import argparse
import concurrent.futures
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
    from reft_rs.io import pretrained

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


def make_control_vectors(root: str, hidden: int, count: int = ADAPTERS) -> list[str]:
    """Control-vector files laid out as repeng writes them (``direction.N``
    for layers 6 to 20), small random directions."""
    import gguf
    import numpy as np

    paths = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        path = os.path.join(root, f"vector{seed}.gguf")
        writer = gguf.GGUFWriter(path, "controlvector")
        writer.add_string("controlvector.model_hint", "llama")
        writer.add_uint32("controlvector.layer_count", 15)
        for layer in range(6, 21):
            writer.add_tensor(f"direction.{layer}", (0.05 * rng.normal(size=hidden)).astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
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
    try:
        while True:
            try:
                api.models.list()
                return process
            except (openai.APIConnectionError, openai.InternalServerError):  # not up, or loading (503)
                if process.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"the server failed: {log.read()[-2000:]}") from None
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
    except BaseException:
        stop_server(process)  # never left running behind a failed start
        raise


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
        extra_body={"ignore_eos": True, **extra},
    ):
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if tokens != NEW:
        raise SystemExit(f"a reply from {model} held {tokens} tokens, not {NEW}: the sides would not compare")
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

    if tokens != NEW * clients * rounds:
        raise SystemExit(f"{tokens} tokens came back, not {NEW * clients * rounds}")
    return {
        "tok_s": tokens / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": pct(ttfts, 0.99),
        "gap_p50": pct(gaps, 0.5),
        "gap_p99": pct(gaps, 0.99),
        "tokens": tokens,
    }


def row(name: str, clients: int, result: dict[str, float]) -> str:
    return (
        f"{name:34}{clients:>8}{result['tok_s']:>9.1f}{result['ttft_p50']:>10.3f}{result['ttft_p99']:>10.3f}"
        f"{result['gap_p50'] * 1000:>7.1f}ms{result['gap_p99'] * 1000:>7.1f}ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--files", nargs="+", default=["q4_1", "q4_k_m"], choices=["q4_1", "q4_k_m"])
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import llamacpp_build

    from reft_rs.io import pretrained

    bin_dir = llamacpp_build.build()
    paths = {"q4_1": str(pretrained.smollm2_gguf())}
    if "q4_k_m" in args.files:
        paths["q4_k_m"] = str(llamacpp_build.smollm2_files(("Q4_K_M",))["Q4_K_M"])
    env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads)}
    print(f"CPU features: {llamacpp_build.features_label()} ({args.threads} threads)")
    print(f"llama-server: {bin_dir} ({' '.join(llamacpp_build.cmake_flags())})")
    print(
        f"SmolLM2-135M, {NEW}-token streamed replies to ~32-token prompts, "
        f"{args.rounds} request(s) per client, every reply checked to hold {NEW} tokens"
    )
    header = f"{'':34}{'clients':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'gap p50':>9}{'gap p99':>9}"
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-c", f"import runpy; runpy.run_path({__file__!r})['make_adapters']({tmp!r})"],
            check=True,
            capture_output=True,
        )
        adapters = [os.path.join(tmp, f"loreft{i}") for i in range(ADAPTERS)]
        vectors = make_control_vectors(tmp, 576)
        for kind in args.files:
            path = paths[kind]
            rows: dict[tuple[str, int], dict[str, float]] = {}
            print(f"\n{kind} ({os.path.basename(path)})\n{header}")
            port = free_port()
            command = [sys.executable, "-m", "reft_rs", "serve", "--model", path, "--port", str(port)]
            command += ["--model-name", "base", "--threads", str(args.threads), "--log-level", "warning"]
            command += ["--max-batch", str(max(args.clients))]
            command += [f"--adapter=a{i}={p}" for i, p in enumerate(adapters)]
            command += [f"--adapter=v{i}={p}" for i, p in enumerate(vectors)]
            server = start_server(command, port, env)
            try:
                for clients in args.clients:
                    for scenario, models in (
                        ("base model", ["base"]),
                        ("8 LoReFT adapters", [f"a{i}" for i in range(ADAPTERS)]),
                        ("8 control vectors", [f"v{i}" for i in range(ADAPTERS)]),
                    ):
                        result = load(port, models, clients, args.rounds, {})
                        rows[scenario, clients] = result
                        print(row("reft-rs serve, " + scenario, clients, result), flush=True)
            finally:
                stop_server(server)
            for clients in args.clients:
                for scenario, extra in (
                    ("base model", []),
                    ("1 control vector", ["--control-vector", vectors[0]]),
                ):
                    port = free_port()
                    command = [
                        str(bin_dir / "llama-server"),
                        "-m",
                        path,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ]
                    command += ["-t", str(args.threads), "--parallel", str(clients), "--cont-batching"]
                    command += ["-c", str(clients * 256), "--alias", "base", *extra]
                    server = start_server(command, port, env)
                    try:
                        result = load(port, ["base"], clients, args.rounds, {})
                    finally:
                        stop_server(server)
                    rows["llama-server " + scenario, clients] = result
                    print(row("llama-server, " + scenario, clients, result), flush=True)
            for clients in args.clients:
                ours = rows["8 LoReFT adapters", clients]
                for theirs in ("llama-server base model", "llama-server 1 control vector"):
                    ratio = ours["tok_s"] / rows[theirs, clients]["tok_s"]
                    summary.append(
                        f"  {kind}, {clients} clients: reft-rs 8 adapters {ratio:.2f}x {theirs} (target >= 1.0)"
                    )
                ratio = (
                    rows["8 control vectors", clients]["tok_s"]
                    / rows["llama-server 1 control vector", clients]["tok_s"]
                )
                summary.append(
                    f"  {kind}, {clients} clients: reft-rs 8 control vectors {ratio:.2f}x llama-server's one"
                )
                mine, theirs = ours["ttft_p50"], rows["llama-server base model", clients]["ttft_p50"]
                summary.append(
                    f"  {kind}, {clients} clients: TTFT p50 {mine:.3f} s against {theirs:.3f} s "
                    f"({'met' if mine <= theirs else 'not met'}: target <=)"
                )
    print("\nratios (same run):")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
