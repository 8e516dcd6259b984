"""Evaluation as in the DreamBooth paper (Ruiz et al., CVPR 2023, sections 4.1 and 4.3).

For each trained subject, the trained model renders N images for each of the paper's 25 prompts
(one set for objects, one for live subjects) and, for PRES, images of the plain class prompt. Ray
actors render (one per GPU), each image under a fixed name and seed, so a re-run renders only what
is missing. Then:

`eval.dino: toy-dino` with `eval.clip: toy-clip` measure the toy world instead (toyworld.ToyMetrics).

- DINO:   mean cosine similarity of DINO ViT CLS embeddings, generated vs real subject images
- CLIP-I: the same with CLIP image embeddings                               (both: subject fidelity)
- CLIP-T: mean cosine of each image's CLIP embedding with its prompt's      (prompt fidelity); the
          identifier is dropped from the prompt, since a rare token means nothing to CLIP
- PRES:   DINO similarity of the model's "a {class}" images to the real subject (lower: the class
          prior survived fine-tuning)
- DIV:    mean pairwise perceptual distance between images of one prompt (higher: more diverse).
          LPIPS's formula (per-position unit-normalised features, squared difference, spatial mean)
          over the DINO ViT's layers with uniform weights: VGG/AlexNet LPIPS needs torchvision and
          its weights, which this project does not ship. Compare DIV between runs, not with the paper.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import ray
import torch
import torch.nn.functional as F
from PIL import Image

from . import cluster, models, priors, samples
from .errors import UserError
from .images import load_subject_images
from .settings import S3Settings
from .spec import EvalConfig, JobSpec, Subject
from .storage import Storage

_PLACES = (
    "in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
    "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
    "with a blue house in the background", "on top of a purple rug in a forest",
)
_PROPERTIES = ("a red {identifier} {class_noun}", "a purple {identifier} {class_noun}",
               "a shiny {identifier} {class_noun}", "a wet {identifier} {class_noun}",
               "a cube shaped {identifier} {class_noun}")
_S = "a {identifier} {class_noun} "
OBJECT_PROMPTS = tuple(_S + p for p in _PLACES + (
    "with a wheat field in the background", "with a tree and autumn leaves in the background",
    "with the Eiffel Tower in the background", "floating on top of water", "floating in an ocean of milk",
    "on top of green grass with sunflowers around it", "on top of a mirror",
    "on top of the sidewalk in a crowded street", "on top of a dirt road", "on top of a white rug",
)) + _PROPERTIES
LIVE_PROMPTS = tuple(_S + p for p in _PLACES + (
    "wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf", "wearing a black top hat and a monocle",
    "in a chef outfit", "in a firefighter outfit", "in a police outfit", "wearing pink glasses",
    "wearing a yellow shirt", "in a purple wizard outfit",
)) + _PROPERTIES
# Class nouns that get the live-subject prompts under `prompts: auto` (the paper's dogs and cats, and kin).
LIVE_CLASSES = frozenset(
    "dog puppy cat kitten animal pet bird parrot horse rabbit bunny hamster person man woman boy girl child "
    "baby face".split())


class EvalError(UserError, ValueError):
    """Evaluation cannot start (e.g. the subject has not finished training); the message says why."""


def templates(cfg: EvalConfig, subject: Subject) -> tuple[str, ...]:
    if cfg.prompts == "auto":
        return LIVE_PROMPTS if subject.class_noun.split()[-1].lower() in LIVE_CLASSES else OBJECT_PROMPTS
    return {"objects": OBJECT_PROMPTS, "live": LIVE_PROMPTS}.get(cfg.prompts, cfg.prompts)


def clip_text(template: str, subject: Subject) -> str:
    """The prompt CLIP-T scores against: the identifier dropped."""
    return " ".join(template.format(identifier="", class_noun=subject.class_noun).split())


# ---- the arithmetic (pure functions of embeddings) ------------------------------------------------

def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs (row of a, row of b)."""
    return cosine_matrix(a, b).mean().item()


def perceptual_distance(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
    """LPIPS's formula with uniform weights: per layer, features [T, C] unit-normalised over channels,
    squared difference summed over channels, mean over positions; then mean over layers. 0 iff equal."""
    d = [((F.normalize(a.double(), dim=-1) - F.normalize(b.double(), dim=-1)) ** 2).sum(-1).mean() for a, b in zip(x, y)]
    return torch.stack(d).mean().item()


def mean_pairwise_distance(layers: list[torch.Tensor]) -> float | None:
    """Mean perceptual distance over all pairs i<j of N images, layers given as [N, T, C] tensors."""
    n = layers[0].shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        return None
    return sum(perceptual_distance([t[i] for t in layers], [t[j] for t in layers]) for i, j in pairs) / len(pairs)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ---- the metric models ---------------------------------------------------------------------------

class MetricModels:
    """DINO and CLIP, each from a hub id, a local folder, an s3:// folder, or 'tiny-dino'/'tiny-clip'."""

    def __init__(self, dino: str, clip: str, s3: S3Settings | None = None, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        self.device = device
        try:
            path = models.resolve(dino, s3, marker="config.json")
            self.dino = AutoModel.from_pretrained(path).to(device).eval()
            self.dino_processor = AutoImageProcessor.from_pretrained(path)
            path = models.resolve(clip, s3, marker="config.json")
            self.clip = CLIPModel.from_pretrained(path).to(device).eval()
            self.clip_processor = CLIPProcessor.from_pretrained(path)
        except OSError as e:
            raise models.ModelError(f"metric model: cannot load ({e})") from None

    @torch.no_grad()
    def dino_features(self, images: list[Image.Image], batch: int = 32) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """CLS embeddings [N, C], and every layer's patch tokens [N, T, C] (for DIV)."""
        cls, layers = [], []
        for k in range(0, len(images), batch):
            px = self.dino_processor(images=images[k : k + batch], return_tensors="pt")["pixel_values"]
            out = self.dino(pixel_values=px.to(self.device), output_hidden_states=True)
            cls.append(out.last_hidden_state[:, 0].cpu())
            layers.append([h[:, 1:].cpu() for h in out.hidden_states[1:]])
        return torch.cat(cls), [torch.cat(t) for t in zip(*layers)]

    @torch.no_grad()
    def clip_images(self, images: list[Image.Image], batch: int = 32) -> torch.Tensor:
        out = []
        for k in range(0, len(images), batch):
            px = self.clip_processor(images=images[k : k + batch], return_tensors="pt")["pixel_values"]
            out.append(_pooled(self.clip.get_image_features(pixel_values=px.to(self.device))).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def clip_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.clip_processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _pooled(self.clip.get_text_features(**tok)).cpu()

    def clip_t(self, image_features: torch.Tensor, text: str) -> float:
        return mean_cosine(image_features, self.clip_texts([text]))


TOY_METRICS = ("toy-dino", "toy-clip")


def metric_models(dino: str, clip: str, s3: S3Settings | None = None, device: str = "cpu"):
    """DINO and CLIP (MetricModels), or the toy world's stand-ins for both (toyworld.ToyMetrics)."""
    if (dino in TOY_METRICS) != (clip in TOY_METRICS):
        raise EvalError(f"eval.dino {dino!r} and eval.clip {clip!r}: toy-dino and toy-clip go together "
                        "(both measure the toy world)")
    if dino in TOY_METRICS:
        from .toyworld import ToyMetrics

        return ToyMetrics(device)
    return MetricModels(dino, clip, s3, device)


def _pooled(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a model output


def score(m: MetricModels, real: list[Image.Image], generated: list[tuple[str, list[Image.Image]]],
          class_images: list[Image.Image]) -> dict:
    """The paper's metrics. `generated`: (CLIP-T text, images) per prompt."""
    real_dino, _ = m.dino_features(real)
    real_clip = m.clip_images(real)
    per_prompt = []
    for text, ims in generated:
        g_dino, g_layers = m.dino_features(ims)
        g_clip = m.clip_images(ims)
        per_prompt.append({
            "prompt": text, "images": len(ims),
            "dino": mean_cosine(g_dino, real_dino), "clip_i": mean_cosine(g_clip, real_clip),
            "clip_t": m.clip_t(g_clip, text), "div": mean_pairwise_distance(g_layers),
        })
    out = {k: _mean(p[k] for p in per_prompt) for k in ("dino", "clip_i", "clip_t", "div")}
    out["pres"] = mean_cosine(m.dino_features(class_images)[0], real_dino) if class_images else None
    return {"metrics": out, "per_prompt": per_prompt}


# ---- rendering on Ray actors ---------------------------------------------------------------------

@dataclass(frozen=True)
class Render:
    name: str  # file name under the eval folder's images/
    prompt: str
    seed: int


def plan(cfg: EvalConfig, subject: Subject) -> tuple[list[tuple[str, list[Render]]], list[Render]]:
    """(per prompt: CLIP-T text and its renders, the class-prompt renders for PRES); fixed names and seeds."""
    base = cfg.seed * 1_000_003
    prompts = [(clip_text(t, subject), [Render(f"p{i:02d}-{j:03d}.png", subject.prompt(t), base + 1000 * i + j)
                                        for j in range(cfg.images_per_prompt)])
               for i, t in enumerate(templates(cfg, subject))]
    pres = [Render(f"class-{j:03d}.png", subject.class_text, base + 500_000 + j) for j in range(cfg.class_images)]
    return prompts, pres


def load_trained(spec: JobSpec, record: dict):
    """The subject's trained pipeline: the exported full model, or the base model with the LoRA."""
    from .export import load_exported

    return load_exported(spec, record)


@ray.remote(max_restarts=3, max_task_retries=3)
class Renderer:
    """Holds one subject's trained pipeline on one device and renders batches of evaluation images."""

    def __init__(self, spec: JobSpec, record: dict, use_gpu: bool):
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.pipe = models.prepare_sampler(load_trained(spec, record), self.device)
        self.storage = Storage(spec.storage, spec.s3)
        self.cfg, self.resolution = spec.eval, spec.train.resolution

    def render(self, folder: tuple[str, ...], batch: list[Render]) -> int:
        have = set(self.storage.listdir(*folder))  # a retried task skips what a dead actor wrote
        todo = [r for r in batch if r.name not in have]
        if not todo:
            return 0
        images = models.generate(self.pipe, [r.prompt for r in todo], height=self.resolution, width=self.resolution,
                                 generator=[torch.Generator(self.device).manual_seed(r.seed) for r in todo],
                                 num_inference_steps=self.cfg.inference_steps, guidance_scale=self.cfg.guidance_scale)
        for r, im in zip(todo, images):
            self.storage.write_bytes(samples.png_bytes(im), *folder, r.name)
        return len(todo)


def render_all(spec: JobSpec, record: dict, folder: tuple[str, ...], renders: list[Render], use_gpu: bool) -> int:
    storage = Storage(spec.storage, spec.s3)
    have = set(storage.listdir(*folder))
    todo = [r for r in renders if r.name not in have]
    if not todo:
        return 0
    bs = spec.eval.batch_size
    batches = [todo[k : k + bs] for k in range(0, len(todo), bs)]
    n = priors.default_actor_count(spec.eval, use_gpu)
    opts = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    actors = [Renderer.options(**opts).remote(spec, record, use_gpu) for _ in range(min(n, len(batches)))]
    try:
        done = sum(ray.util.ActorPool(actors).map_unordered(lambda a, b: a.render.remote(folder, b), batches))
    finally:
        for a in actors:
            ray.kill(a)
    missing = [r.name for r in renders if r.name not in set(storage.listdir(*folder))]
    if missing:
        raise RuntimeError(f"evaluation rendering left {len(missing)} images missing in {storage.url(*folder)}")
    return done


@ray.remote(num_cpus=1)
def score_task(spec: JobSpec, subject: Subject, folder: tuple[str, ...], prompts, pres) -> dict:
    storage = Storage(spec.storage, spec.s3)

    def load(r: Render) -> Image.Image:
        with storage.fs.open(storage.path(*folder, r.name), "rb") as f:
            return Image.open(io.BytesIO(f.read())).convert("RGB")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = metric_models(spec.eval.dino, spec.eval.clip, spec.s3, device)
    real = [s.image for s in load_subject_images(subject.images, spec.train.resolution, spec.s3, spec.skip_bad_images)]
    generated = [(text, [load(r) for r in rs]) for text, rs in prompts]
    result = score(m, real, generated, [load(r) for r in pres])
    sheet = samples.grid([(rs[0].prompt, ims[0]) for (_, rs), (_, ims) in zip(prompts, generated)],
                         cols=min(5, len(prompts)))
    storage.write_bytes(samples.png_bytes(sheet), *folder[:-1], "grid.png")
    return result


def evaluate_subject(spec: JobSpec, subject: Subject, storage: Storage, use_gpu: bool, say=print) -> dict:
    out = ("outputs", spec.name, subject.name)
    record = storage.read_json(*out, "job.json")
    if not record:
        raise EvalError(f"subject {subject.name!r} has no finished training ({storage.url(*out, 'job.json')} "
                        "is missing): run the job first")
    subject = subject.model_copy(update={"identifier": record["identifier"]})  # `auto` as it was resolved
    cfg = spec.eval
    # Images depend on the trained run and the render settings, not on how many are asked for: image
    # j of prompt i always has the same name and seed, so asking for more renders only the new ones.
    key = spec.fingerprint(record["run"], cfg.model_dump(include={"prompts", "inference_steps", "guidance_scale", "seed"}),
                           spec.train.resolution)
    folder = (*out, "eval", key, "images")
    prompts, pres = plan(cfg, subject)
    renders = [r for _, rs in prompts for r in rs] + pres
    say(f"{subject.name}: rendering {len(renders)} evaluation images ({len(prompts)} prompts x "
        f"{cfg.images_per_prompt}, {len(pres)} class images) -> {storage.url(*folder)}")
    rendered = render_all(spec, record, folder, renders, use_gpu)
    result = ray.get(score_task.options(num_gpus=1 if use_gpu else 0).remote(spec, subject, folder, prompts, pres))
    result = {"subject": subject.name, "identifier": subject.identifier, "run": record["run"],
              "model": record["model"], "rendered": rendered, "cached": len(renders) - rendered,
              "settings": cfg.model_dump(), **result,
              "grid": storage.url(*folder[:-1], "grid.png"), "url": storage.url(*folder[:-1], "metrics.json")}
    storage.write_json(result, *folder[:-1], "metrics.json")
    return result


def check(spec: JobSpec, storage: Storage) -> None:
    """Every subject has finished training, and both metric models can be found (their configs read)."""
    from .configs import ModelConfigs, PreflightError

    problems = [f"subject {s.name!r} has no finished training ({storage.url('outputs', spec.name, s.name, 'job.json')} "
                "is missing): run the job first" for s in spec.subjects
                if not storage.exists("outputs", spec.name, s.name, "job.json")]
    for field, ref in (("eval.dino", spec.eval.dino), ("eval.clip", spec.eval.clip)):
        if ref in TOY_METRICS:
            continue
        try:
            if ModelConfigs(ref, spec.s3, field).read("config.json") is None:
                problems.append(f"{field}: {ref!r} has no config.json (not a transformers model folder)")
        except PreflightError as e:
            problems.append(f"{e} (set {field} or --{field.split('.')[1]} to a folder, an s3:// path or "
                            f"'tiny-{field.split('.')[1]}')")
    if (spec.eval.dino in TOY_METRICS) != (spec.eval.clip in TOY_METRICS):
        problems.append("eval.dino and eval.clip: toy-dino and toy-clip go together (both measure the toy world)")
    if problems:
        raise EvalError("evaluation cannot start:\n  " + "\n  ".join(problems))


def evaluate(spec: JobSpec, console=None) -> list[dict]:
    """Evaluate every subject of a finished job; writes each subject's metrics.json and grid.png
    and the job's outputs/<job>/eval.json."""
    storage = Storage(spec.storage, spec.s3)
    check(spec, storage)  # before rendering anything: minutes of renders are lost to a missing model
    use_gpu = cluster.use_gpu(spec)  # the spec's choice, else GPUs now or GPUs the autoscaler can add
    say = console.print if console is not None else print
    results = [evaluate_subject(spec, s, storage, use_gpu, say) for s in spec.subjects]
    storage.write_json({"job": spec.name, "subjects": results}, "outputs", spec.name, "eval.json")
    from .report import build

    build(spec, storage)  # the report shows the metrics
    return results


def table(results: list[dict]):
    from rich.table import Table

    t = Table(title="DreamBooth evaluation (DINO, CLIP-I, CLIP-T: higher is closer; PRES: lower keeps the "
                    "class prior; DIV: higher is more diverse)")
    for col in ("subject", "images", "DINO", "CLIP-I", "CLIP-T", "PRES", "DIV"):
        t.add_column(col)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in results:
        m = r["metrics"]
        t.add_row(r["subject"], str(r["rendered"] + r["cached"]),
                  *(fmt(m[k]) for k in ("dino", "clip_i", "clip_t", "pres", "div")))
    return t


def cmd_eval(args, console) -> int:
    from rich.console import Console

    from .cli import init_ray
    from .spec import EvalConfig, load_spec

    spec = load_spec(args.job)
    overrides = {k: v for k, v in (("images_per_prompt", args.images_per_prompt), ("dino", args.dino),
                                   ("clip", args.clip)) if v is not None}
    if overrides:
        spec = spec.model_copy(update={"eval": EvalConfig.model_validate({**spec.eval.model_dump(), **overrides})})
    init_ray(args.address)
    results = evaluate(spec, console)
    Console(width=max(120, Console().width)).print(table(results))
    for r in results:
        console.print(f"{r['subject']}: {r['url']} (grid {r['grid']})", highlight=False)
    return 0
