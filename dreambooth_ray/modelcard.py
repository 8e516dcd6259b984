"""What the UIs and the Hub read besides the weights: modelspec / kohya keys in a safetensors header, and
a model card (README.md with the Hub's YAML front matter) in each exported folder.

Nothing here names a storage path, a bucket or a credential: the card and headers travel with the files
to ComfyUI, AUTOMATIC1111 and the Hub. A base model is named only by its Hub id; a local or s3:// base
model is left for the user to name.
"""

from __future__ import annotations

import json
import re
import struct
from datetime import datetime, timezone
from pathlib import Path

import yaml

from . import tiny
from .storage import is_remote

# modelspec.implementation: the key layout a file holds (kohya's sai_model_spec values)
IMPL_LDM = "https://github.com/Stability-AI/generative-models"  # kohya's LoRA layout, LDM single files
IMPL_DIFFUSERS = "diffusers"


def hub_id(ref: str) -> str | None:
    """`ref` if it is a Hub model id (owner/name), else None: a built-in, a local folder or an s3:// URL,
    none of which may appear in what is published."""
    if ref in tiny.BUILT_IN or is_remote(ref) or Path(ref).exists() or ref.startswith(("/", ".", "~")):
        return None
    return ref if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) else None


def metadata(family, pipe, *, title: str, trigger: str, resolution: int, implementation: str,
             lora: dict | None = None, output_name: str = "") -> dict[str, str]:
    """A safetensors header's __metadata__: the modelspec keys and, for a LoRA (`lora`: {"rank", "alpha"}),
    kohya's ss_* keys (A1111 labels an SDXL LoRA as SD1 without ss_base_model_version). All strings."""
    md = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.architecture(pipe) + ("/lora" if lora else ""),
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.trigger_phrase": trigger,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    pred = family.prediction_type(pipe)
    if pred:
        md["modelspec.prediction_type"] = pred
    if lora:
        md.update({"ss_base_model_version": family.kohya_base_version(pipe), "ss_network_module": "networks.lora",
                   "ss_network_dim": str(lora["rank"]), "ss_network_alpha": str(float(lora["alpha"])),
                   "ss_output_name": output_name})
    return md


def with_metadata(data: bytes, extra: dict[str, str]) -> bytes:
    """A safetensors file's bytes with `extra` added to its header's __metadata__; the tensors' bytes are
    not touched (their offsets count from the header's end)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = {**header.get("__metadata__", {}), **extra}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the 8-byte alignment safetensors itself writes
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def card(family, *, title: str, trigger: str, base_model: str, lora: dict | None, files: dict[str, str],
         samples: list[tuple[str, str]], steps: int) -> str:
    """README.md for an exported folder: the Hub's front matter (base_model, instance_prompt, tags, widget
    entries for the sample images beside it; the license is the user's to set), what each file is for, and
    how to load it in diffusers, ComfyUI and AUTOMATIC1111/Forge. `files`: {file name: what reads it};
    `samples`: (prompt, relative path) pairs."""
    base = hub_id(base_model)
    front = {**({"base_model": base} if base else {}), "instance_prompt": trigger,
             "tags": ["text-to-image", "diffusers", "dreambooth", *family.tags,
                      *(["lora", "template:sd-lora"] if lora else [])],
             "library_name": "diffusers"}
    if samples:
        front["widget"] = [{"text": prompt, "output": {"url": path}} for prompt, path in samples]
    head = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=1000)
    what = f"LoRA (rank {lora['rank']}, alpha {lora['alpha']:g})" if lora else "fine-tune"
    of = f"[{base}](https://huggingface.co/{base})" if base else "its base model"
    lines = [
        "---", head.rstrip(),
        "# license: set the license you publish under (the base model's license applies to what is derived from it)",
        "---", "", f"# {title}", "",
        f"A DreamBooth {what} of {of} ({family.title}), trained {steps} steps with dreambooth-ray.",
        f"Prompt the subject with **`{trigger}`**.", "",
    ]
    if not base:
        lines += ["The base model was not a Hub id: add `base_model: <owner/name>` above before uploading.", ""]
    if samples:
        lines += ["## Samples", "", *[f"![{p}]({path})" for p, path in samples], ""]
    lines += ["## Files", "", "| file | load it with |", "|---|---|",
              *[f"| `{f}` | {w} |" for f, w in files.items()], ""]
    repo, dtype = '"<this folder, or its Hub repo id>"', f"torch.{family.inference_half}"
    lines += ["## Use it in diffusers", "", "```python", "import torch",
              "from diffusers import AutoPipelineForText2Image", ""]
    if lora:
        lines += [f'pipe = AutoPipelineForText2Image.from_pretrained("{base or "<base model>"}", '
                  f'torch_dtype={dtype}).to("cuda")', f"pipe.load_lora_weights({repo})"]
    else:
        lines += [f'pipe = AutoPipelineForText2Image.from_pretrained({repo}, torch_dtype={dtype}).to("cuda")']
    lines += [f"image = pipe({json.dumps(trigger + ' on the beach')}).images[0]", "```", ""]
    ui = next((f for f, w in files.items() if "ComfyUI" in w), None)
    a1111 = ui is not None and "AUTOMATIC1111" in files[ui]
    lines += ["## Use it in ComfyUI / AUTOMATIC1111 / Forge", ""]
    if ui and lora:
        lines += [f"- ComfyUI: copy `{ui}` into `ComfyUI/models/loras/` and add a *Load LoRA* node after the base "
                  "model's checkpoint loader."]
        if a1111:
            lines += [f"- AUTOMATIC1111 / Forge: copy it into `models/Lora/` and prompt "
                      f"`<lora:{ui.rsplit('.', 1)[0]}:1> {trigger}`."]
    elif ui:
        lines += family.single_file_howto(ui)
    else:
        lines += ["No file for these UIs was written (see `train.export_formats` and `dreambooth-ray export`)."]
    lines.append("")
    return "\n".join(lines)
