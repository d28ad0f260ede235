"""The training step of a LoRA config at its model's real shape on one accelerator, with only
PyTorch, transformers and peft (a bare GPU machine may have no vLLM, Ray, DeepSpeed or MLflow):
random bf16 weights of the config's architecture (Gemma-2-9B for configs/gemma-2-9b-it-sppo-lora.yaml),
the config's LoRA adapter and gradient checkpointing, the recipe's log-prob path and SPPO loss
(`sppo.losses`), the reference log-probs from one pass with the adapter off (pi_t = the base at
the first iteration), and RMSprop on the adapter. Then the same with every weight trained where
it fits (plain bf16 RMSprop, no float32 master weights: a floor of what full fine-tuning needs).

Per way: peak accelerator memory (allocated and reserved by PyTorch), seconds per optimizer step
and tokens a second over the timed steps (after one untimed step), written as JSON.

    python -m bench.gpu_lora --out lora_gpu.json                       # on a GPU, the config's shape
    python -m bench.gpu_lora --shape small --device cpu --out dry.json  # the dry run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path

import torch
import yaml

from sppo.losses import LossParams, PairBatch, sequence_logps, sppo_loss

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gemma-2-9b-it-sppo-lora.yaml"
# Gemma-2-9B's architecture (its config.json on the hub); `small` is the same code at a dry-run size.
SHAPES = {
    "gemma-2-9b": {"vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256},
    "small": {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64},
}


def build_model(shape: str, device: torch.device):
    """Gemma-2 of `shape` with random bf16 weights made on `device` (no float32 copy, no download)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**SHAPES[shape], max_position_embeddings=8192, attn_implementation="eager")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = Gemma2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()  # also makes the embeddings' output require grad (for adapters)
    return model


def random_batch(vocab: int, pairs: int, tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`pairs` chosen rows then `pairs` rejected rows of `tokens` tokens, the second half the response."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, vocab, (2 * pairs, tokens), generator=generator)
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    loss_mask[:, tokens // 2:] = True
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "loss_mask": loss_mask.to(device)}


def logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    out = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    half = out.shape[0] // 2
    return out[:half], out[half:]


def measure(model, batch, train_cfg: dict, steps: int, device: torch.device) -> dict:
    """One untimed step, then `steps` timed ones; the reference from one pass before them."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.RMSprop(trainable, lr=float(train_cfg["learning_rate"]))
    pairs = batch["input_ids"].shape[0] // 2
    model.eval()
    with torch.no_grad(), (model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()):
        ref_chosen, ref_rejected = logps(model, batch)
    model.train()
    probs = torch.full((pairs,), 0.5, device=device)
    lengths = batch["loss_mask"][:pairs].sum(dim=1)
    params = LossParams(beta=1.0 / float(train_cfg["eta"]))
    step_seconds = []
    for step in range(steps + 1):
        synchronize(device)
        started = time.perf_counter()
        chosen, rejected = logps(model, batch)
        loss = sppo_loss(PairBatch(chosen, rejected, ref_chosen, ref_rejected, probs, probs + 0.1, probs - 0.1,
                                   lengths, lengths), params).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step > 0:
            step_seconds.append(time.perf_counter() - started)
    tokens = batch["input_ids"].numel()
    return {"trainable_parameters": sum(p.numel() for p in trainable),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds_per_step": sum(step_seconds) / len(step_seconds),
            "tokens_per_s": tokens * len(step_seconds) / sum(step_seconds), "final_loss": float(loss.detach()),
            **memory(device)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory(device: torch.device) -> dict:
    if device.type != "cuda":
        import resource

        return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def run_way(way: str, shape: str, config: dict, batch_shape: tuple[int, int], steps: int, device: torch.device) -> dict:
    from peft import LoraConfig, get_peft_model

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = None
    try:
        started = time.perf_counter()
        model = build_model(shape, device)
        built_s = time.perf_counter() - started
        if way == "lora":
            lora = config["train"]["lora"]
            model = get_peft_model(model, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"],
                                                     lora_dropout=lora.get("dropout", 0.0),
                                                     target_modules=lora["target_modules"], task_type="CAUSAL_LM"),
                                   autocast_adapter_dtype=False)
        batch = random_batch(model.config.vocab_size, *batch_shape, device)
        return {"fits": True, "build_s": built_s, **measure(model, batch, config["train"], steps, device)}
    except torch.OutOfMemoryError as err:
        return {"fits": False, "error": str(err).splitlines()[0], **memory(device)}
    finally:
        del model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_lora", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="the LoRA config whose train values are used")
    parser.add_argument("--shape", choices=list(SHAPES), default="gemma-2-9b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pairs", type=int, default=8, help="pairs a step (2 sequences each)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens a sequence (half of them the response)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps, after one untimed")
    parser.add_argument("--ways", default="lora,full", help="lora, full or both, in this order")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    device = torch.device(args.device)
    record = {"config": str(args.config.name), "shape": args.shape, "pairs": args.pairs, "tokens": args.tokens,
              "steps": args.steps, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or platform.machine(), "torch": torch.__version__, "ways": {}}
    for way in args.ways.split(","):
        record["ways"][way] = result = run_way(way, args.shape, config, (args.pairs, args.tokens), args.steps, device)
        print(way, json.dumps(result), flush=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
