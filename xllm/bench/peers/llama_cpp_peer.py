"""llama.cpp peer, through `llama-cpp-python`, on a GGUF written from the same safetensors weights.

llama-cpp-python's `Llama` object holds one sequence (its high-level API batches only
embeddings across sequences), so it serves the batch-1 workload: one prefill call, then token by
token with llama.cpp's greedy sampler (repeat penalty 1.0, i.e. off). Workloads of several
prompts go through the low-level bindings instead (`generate_batched`): every prompt in one
multi-sequence context, as llama.cpp's batched example and server run them, greedy by argmax.
Batched float32 matmuls accumulate in another order than single-sequence ones, so a long greedy
continuation may drift from xllm's after some tens of tokens; the table reports how many match.
The GGUF is converted once and cached (`xllm.bench.gguf_export`); conversion is never timed.

Run as a script (``python llama_cpp_peer.py GGUF IDS N_THREADS``) it is the start-up probe: load
the GGUF, generate one token, print it after `FIRST_TOKEN_MARKER`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xllm.bench.peers import PeerContext, PeerResult, TimedRuns
    from xllm.bench.workloads import Workload

FIRST_TOKEN_MARKER = "XLLM_BENCH_FIRST_TOKEN"  # same as xllm.bench.peers (no xllm import here)
INSTALL_HINT = "pip install llama-cpp-python gguf  (or: pip install 'xllm[bench]')"


def load(gguf_path: str, n_ctx: int, n_threads: int | None = None):
    from llama_cpp import Llama

    n_ctx = max(64, n_ctx)
    return Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_batch=min(512, n_ctx),
        n_threads=n_threads or os.cpu_count(),
        logits_all=False,
        verbose=False,
    )


def generate(llm, prompt: list[int], n_new: int) -> list[int]:
    """Greedy continuation of `prompt`, exactly `n_new` tokens: EOS is not a stop (the generator
    never checks it; only `create_completion` does)."""
    llm.reset()  # no prefix reuse from the previous prompt: each request pays its own prefill
    out: list[int] = []
    gen = llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True)
    try:
        for token in gen:
            out.append(int(token))
            if len(out) >= n_new:
                break
    finally:
        gen.close()
    return out


def _quiet() -> None:
    """Silences llama.cpp's load-time log, which the low-level API prints to stderr by default."""
    try:
        from llama_cpp._logger import set_verbose

        set_verbose(False)
    except ImportError:  # a private module: losing it only costs log noise
        pass


def generate_batched(
    gguf_path: str,
    prompts: list[list[int]],
    output_lens: list[int],
    n_threads: int | None = None,
    repeats: int = 1,
) -> list[tuple[list[list[int]], float]]:
    """`repeats` runs of `batched_runs`: (new token ids, seconds) each."""
    runs = batched_runs(gguf_path, prompts, output_lens, n_threads)
    try:
        return [next(runs) for _ in range(repeats)]
    finally:
        runs.close()


def batched_runs(
    gguf_path: str, prompts: list[list[int]], output_lens: list[int], n_threads: int | None = None
) -> Iterator[tuple[list[list[int]], float]]:
    """All prompts at once through llama.cpp's multi-sequence batch API (the low-level bindings;
    `Llama` holds one sequence), as llama.cpp's own batched example and server do: prefill packed
    into batches of up to 512 tokens, then one decode call per step carrying one token of every
    unfinished sequence, greedy (argmax) on the host. The model is loaded at the first run and
    freed when the iterator is closed; each run starts from an emptied KV cache and yields (new
    token ids, seconds), the model load and a warm-up decode excluded from the seconds."""
    import ctypes

    import llama_cpp as lc
    import numpy as np

    n_seq = len(prompts)
    if n_seq > lc.llama_max_parallel_sequences():
        raise ValueError(f"{n_seq} sequences: llama.cpp runs at most {lc.llama_max_parallel_sequences()}")
    n_threads = n_threads or os.cpu_count() or 1
    per_seq = max(len(p) + o for p, o in zip(prompts, output_lens, strict=True)) + 8
    per_seq = -(-per_seq // 256) * 256
    n_batch = 512
    _quiet()
    lc.llama_backend_init()
    mparams = lc.llama_model_default_params()
    model = lc.llama_model_load_from_file(str(gguf_path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = per_seq * n_seq
    cparams.n_batch = cparams.n_ubatch = n_batch
    cparams.n_seq_max = n_seq
    # One KV stream per sequence: each token attends over its own sequence only, not a shared pool.
    cparams.kv_unified = False
    cparams.n_threads = cparams.n_threads_batch = n_threads
    ctx = lc.llama_init_from_model(model, cparams)
    if not ctx:
        lc.llama_model_free(model)
        raise RuntimeError("llama.cpp could not create a context")
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(n_batch, 0, 1)

    def decode(entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """entries: (token, pos, seq, want_logits); returns the argmax of each wanted row."""
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = want
        rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = []
        for i, (_, _, _, want) in enumerate(entries):
            if want:
                row = lc.llama_get_logits_ith(ctx, i)
                out.append(
                    int(
                        np.ctypeslib.as_array(
                            ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), (n_vocab,)
                        ).argmax()
                    )
                )
        return out

    def run_once() -> tuple[list[list[int]], float]:
        # Every run prefills from an empty cache: nothing of the previous run is reused.
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        outputs: list[list[int]] = [[] for _ in prompts]
        start = time.perf_counter()
        pending: list[tuple[int, int, int, bool]] = []
        owners: list[int] = []

        def flush() -> None:
            for seq, tok in zip(owners, decode(pending), strict=True):
                outputs[seq].append(tok)
            pending.clear()
            owners.clear()

        for seq, prompt in enumerate(prompts):
            for pos, tok in enumerate(prompt):
                last = pos == len(prompt) - 1
                pending.append((tok, pos, seq, last))
                if last:
                    owners.append(seq)
                if len(pending) == n_batch:
                    flush()
        if pending:
            flush()
        while True:
            live = [s for s in range(n_seq) if len(outputs[s]) < output_lens[s]]
            if not live:
                break
            for i in range(0, len(live), n_batch):
                chunk = live[i : i + n_batch]
                step = [(outputs[s][-1], len(prompts[s]) + len(outputs[s]) - 1, s, True) for s in chunk]
                for s, tok in zip(chunk, decode(step), strict=True):
                    outputs[s].append(tok)
        return outputs, time.perf_counter() - start

    try:
        decode([(prompts[0][-1], 0, 0, True)])  # warm-up: first-call costs are not throughput
        while True:
            yield run_once()
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
        lc.llama_model_free(model)


def _single_runs(path: str, workload: Workload, n_threads: int) -> Iterator[tuple[list[list[int]], float]]:
    """The one prompt through `Llama.generate`, again and again (loaded at the first run)."""
    llm = load(path, workload.max_len + 8, n_threads)
    generate(llm, workload.prompts[0][::-1], 2)  # warm-up: first-call costs are not throughput
    while True:
        start = time.perf_counter()
        outputs = [generate(llm, workload.prompts[0], workload.output_lens[0])]
        yield outputs, time.perf_counter() - start


def _counted(
    runs: Iterator[tuple[list[list[int]], float]], expected: int
) -> Iterator[tuple[list[list[int]], float]]:
    try:
        for outputs, seconds in runs:
            assert sum(len(o) for o in outputs) == expected, "llama.cpp produced a different number of tokens"
            yield outputs, seconds
    finally:
        runs.close()


class LlamaCppPeer:
    name = "llama.cpp"

    def unavailable(self, ctx: PeerContext) -> str | None:
        from xllm.bench.peers import importable

        missing = [m for m, pkg in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf")) if not importable(m)]
        if missing:
            return f"{', '.join(missing)} not importable: {INSTALL_HINT}"
        return None

    def gguf_path(self, ctx: PeerContext) -> str:
        from xllm.bench.gguf_export import ensure_gguf

        return str(ensure_gguf(ctx.model_path, ctx.dtype, ctx.gguf_cache_dir))

    def run(self, ctx: PeerContext, workload: Workload) -> PeerResult:
        from xllm.bench.peers import take_runs

        note, runs = self.timed_runs(ctx, workload)
        return take_runs(self.name, runs, ctx.repeats, workload, note)

    def timed_runs(self, ctx: PeerContext, workload: Workload) -> tuple[str, TimedRuns]:
        path = self.gguf_path(ctx)
        if workload.num_prompts > 1:
            runs = batched_runs(path, workload.prompts, workload.output_lens, ctx.threads)
            how = "all prompts in one multi-sequence batch (low-level API)"
        else:
            runs = _single_runs(path, workload, ctx.threads)
            how = "Llama.generate"
        return f"{ctx.dtype} GGUF, {how}, {ctx.threads} threads", _counted(runs, workload.output_tokens)

    def startup(self, ctx: PeerContext, workload: Workload) -> float:
        from xllm.bench.peers import PYTHON, peer_script, script_env, time_to_first_token

        path = self.gguf_path(ctx)  # converted before the clock starts: a one-time cost
        ids = ",".join(map(str, workload.prompts[0]))
        cmd = [PYTHON, peer_script("llama_cpp_peer.py"), path, ids, str(ctx.threads)]
        return time_to_first_token(cmd, env=script_env()).seconds


def main(argv: list[str]) -> int:
    path, ids, threads = argv[1], [int(t) for t in argv[2].split(",")], int(argv[3])
    llm = load(path, len(ids) + 16, threads)
    token = generate(llm, ids, 1)[0]
    print(f"{FIRST_TOKEN_MARKER} {token}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
