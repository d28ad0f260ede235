"""`python -m sppo.export`: one finished iteration's checkpoint and model card, copied to a new directory.

That directory is what `from_pretrained` loads and `hf upload REPO DIR` uploads as it is (`hf`
is huggingface_hub's command line); `--push-to-hub` uploads it with huggingface_hub's API.

An iteration trained with `train.lora` published its adapter alone. By default it is exported
merged into the base (peft's `merge_and_unload` on this machine's CPU, in the base's dtype, with
the base's tokenizer): a full model, as a full fine-tune's. With `--adapter`, the adapter alone,
in PEFT's shape (`adapter_config.json` naming the base as the run's config names it,
`adapter_model.safetensors`, a card with `library_name: peft`): what
`PeftModel.from_pretrained(base, DIR)` loads.

Only a finished iteration is exported (its tracking stage is in the run's manifest); the target
must not exist or be empty, and is filled through a temporary sibling renamed into place, so
nothing is ever overwritten or left half-copied.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from sppo.config import ConfigError, RunConfig, load_config
from sppo.manifest import RunManifest
from sppo.model_card import CARD_FILE, card_of
from sppo.models import local_model
from sppo.policy import ADAPTER_CONFIG, ADAPTER_DIR, Policy
from sppo.run_directory import IterationDir, RunDirectory
from sppo.storage import publish_directory


class ExportError(ValueError):
    """The run, iteration, target or hub settings do not allow the export."""


def check_hub_access() -> str:
    """The token to upload with; refuses, naming what to do, when offline or without one."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ExportError("--push-to-hub: the Hugging Face hub is switched off here (HF_HUB_OFFLINE=1); "
                          "export with --to, then upload from a machine that reaches the hub")
    token = get_token()
    if not token:
        raise ExportError("--push-to-hub: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
    return token


def export_iteration(output_dir: Path, iteration: int, target: Path, adapter: bool = False) -> Path:
    """Copy iteration `iteration`'s checkpoint (with `adapter`, its LoRA adapter alone) and card to
    `target`; returns `target`."""
    output_dir = output_dir.resolve()
    run = RunDirectory(output_dir)
    if not run.manifest_file.is_file():
        raise ExportError(f"--output-dir: {output_dir} holds no run ({run.manifest_file.name} missing)")
    it = run.iteration(iteration)
    if RunManifest(run).stage(iteration, "tracking") is None:
        raise ExportError(f"--iteration {iteration}: iteration {iteration} of {output_dir} is not finished; "
                          "re-submit the run to finish it")
    if not it.trained:
        raise ExportError(f"--iteration {iteration}: the checkpoint {it.checkpoint} is missing or incomplete")
    trained_adapter = it.checkpoint / ADAPTER_DIR
    if adapter and not (trained_adapter / ADAPTER_CONFIG).is_file():
        raise ExportError(f"--adapter: iteration {iteration} was not trained with train.lora ({trained_adapter} "
                          "holds no adapter); export the full checkpoint without --adapter")
    target = target.resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"--to: {target} exists and is not an empty directory; nothing was overwritten")

    def fill(staging: Path) -> None:
        if adapter:
            # copyfile, not copy2: new files take the exporting user's umask, not the checkpoint's modes.
            shutil.copytree(trained_adapter, staging, copy_function=shutil.copyfile, dirs_exist_ok=True)
            adapter_card(load_config(run.config_file), it, staging)
        elif not (it.checkpoint / "config.json").is_file():  # train.lora published the adapter alone
            cfg = load_config(run.config_file)
            write_merged(Policy(cfg.policy.path, str(trained_adapter)), staging, cfg.policy.trust_remote_code)
            (staging / CARD_FILE).write_text(str(card_of(cfg, it, adapter=False)))
        else:
            shutil.copytree(it.checkpoint, staging, copy_function=shutil.copyfile, dirs_exist_ok=True)
            if not (staging / CARD_FILE).exists():  # a checkpoint published before cards were written
                (staging / CARD_FILE).write_text(str(card_of(load_config(run.config_file), it)))

    publish_directory(target, fill)  # an empty target directory (checked above) is replaced
    return target


def adapter_card(cfg: RunConfig, it: IterationDir, staging: Path) -> None:
    """The adapter's config names the base as the run's config does (a hub id, where the
    published one holds the path the workers loaded it from), and its card is the iteration's
    card in PEFT's shape, in place of peft's template."""
    config_file = staging / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = cfg.policy.path
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    (staging / CARD_FILE).write_text(str(card_of(cfg, it, adapter=True)))


def write_merged(policy: Policy, target: Path, trust_remote_code: bool = False) -> None:
    """The base plus its adapter merged by peft into one full model directory: the base's
    weights' dtype and its tokenizer (and chat template), what transformers and vLLM load. The
    whole base is held in this process's memory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = local_model(policy.weights)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, policy.adapter).merge_and_unload()
    merged.save_pretrained(target)
    AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code).save_pretrained(target)


def push_to_hub(folder: Path, repo_id: str, token: str, private: bool) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                             commit_message=f"Upload {folder.name} exported by sppo").commit_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sppo.export", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, type=Path, metavar="DIR", help="the run's output directory")
    parser.add_argument("--iteration", required=True, type=int, metavar="N", help="the iteration to export")
    parser.add_argument("--to", required=True, type=Path, metavar="PATH",
                        help="a new (or empty) directory for the model (or adapter) and its README.md card")
    parser.add_argument("--adapter", action="store_true",
                        help="export the iteration's LoRA adapter alone (runs with train.lora), not merged into "
                             "the base")
    parser.add_argument("--push-to-hub", metavar="REPO", help="then upload PATH to this hub repository")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    args = parser.parse_args(argv)
    try:
        token = check_hub_access() if args.push_to_hub else None  # before anything is copied
        target = export_iteration(args.output_dir, args.iteration, args.to, adapter=args.adapter)
    except (ExportError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    loader = "PeftModel.from_pretrained(base, '{}')" if args.adapter else "from_pretrained('{}')"
    print(f"exported iteration {args.iteration} to {target} (load it with {loader.format(target)})")
    if args.push_to_hub:
        print(f"uploaded to {push_to_hub(target, args.push_to_hub, token, args.private)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
