"""What a language-model pullback costs against the vanilla gradient: time and saved memory, eager and compiled.

    python benchmarks/text_cost.py [--configs gpt2-small llama-100m] [--lengths 128 512] [--compiled-lengths 128]
                                   [--rounds 5]

Random weights from two configs, no download: GPT-2 small (124M parameters) and a Llama-style
decoder of about 100M parameters (SwiGLU MLPs, RMSNorm, grouped-query attention).  For each
sequence length, one sequence, the input-embedding gradient of the next token's logit through

* the model itself (``excitation.text.gradient``), the denominator;
* the excited model (``excitation.text.pullback``);

eager, then compiled with Inductor (``torch.compile`` of the same embeddings-to-logits module for
vanilla, ``prepare(compile=True)`` for ours), interleaved round by round.  Memory is the bytes of
the storages autograd saves for the backward (what ``excitation bench`` counts).  Prints a Markdown
table with the CPU, torch and transformers versions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch

import excitation
from excitation import api, text
from excitation.bench import cpu_model

CONFIGS = {
    "gpt2-small": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                                                         vocab_size=50257)),
    "llama-100m": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=768, intermediate_size=2048,
                                                           num_hidden_layers=10, num_attention_heads=12,
                                                           num_key_value_heads=4, vocab_size=32000,
                                                           max_position_embeddings=1024)),
}


def _saved_bytes(fn: Callable[[], object]) -> int:
    storages: Dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _gradient_of(module, embeddings: torch.Tensor, mask: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        leaf = embeddings.detach().requires_grad_(True)
        logits = module(leaf, mask)
        (grad,) = torch.autograd.grad(logits[0, -1].max(), leaf)
        return grad

    return run


def measure(name: str, length: int, rounds: int, compile_: bool) -> list:
    import transformers

    config_cls, model_cls, fields = CONFIGS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields)).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    ids = torch.randint(0, fields.get("vocab_size", 1000), (1, length), generator=torch.Generator().manual_seed(0))
    embeddings = model.get_input_embeddings()(ids)
    mask = torch.ones_like(ids)
    wrapper = text.embeddings_model(model)
    methods = {"vanilla": _gradient_of(api.prepare(wrapper, excited=False), embeddings, mask),
               "pullback": _gradient_of(api.prepare(wrapper), embeddings, mask)}
    if compile_:
        methods["vanilla, compiled"] = _gradient_of(torch.compile(api.prepare(wrapper, excited=False)), embeddings,
                                                    mask)
        methods["pullback, compiled"] = _gradient_of(api.prepare(wrapper, compile=True), embeddings, mask)
    for run in methods.values():  # warm-up and compile
        run()
        run()
    times: Dict[str, list] = {method: [] for method in methods}
    for _ in range(rounds):
        for method, run in methods.items():
            start = time.perf_counter()
            run()
            times[method].append(time.perf_counter() - start)
    saved = {method: _saved_bytes(run) for method, run in methods.items()}
    rows = []
    for method in methods:
        base = "vanilla, compiled" if "compiled" in method else "vanilla"
        median = statistics.median(times[method])
        rows.append((name, length, method, median, median / statistics.median(times[base]), saved[method],
                     saved[method] / saved[base]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--compiled-lengths", nargs="*", type=int, default=[128],
                        help="lengths also measured compiled (each compiles both models once)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import transformers

    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, excitation {excitation.__version__}; batch 1, random weights, {args.rounds} "
          f"interleaved rounds; memory = bytes autograd saves")
    print()
    print("| config | tokens | method | s (median) | time / vanilla | saved MiB | memory / vanilla |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs:
        for length in args.lengths:
            for row in measure(name, length, args.rounds, length in args.compiled_lengths):
                config, tokens, method, seconds, ratio, saved, memory = row
                print(f"| {config} | {tokens} | {method} | {seconds:.3f} | {ratio:.3f} | {saved / 2**20:.0f} | "
                      f"{memory:.3f} |", flush=True)
            api.clear_cache()
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
