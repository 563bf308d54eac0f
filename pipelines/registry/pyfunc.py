"""The MLflow pyfunc wrapper of a pyoco video model ("models from code": MLflow copies this file into the
logged model and runs it at load time, so loading never unpickles a class).

Artifacts (see ``pipelines.registry.register.register_model``):

    package/          the pyoco model folder (pyoco.package): unet/ (diffusers, safetensors),
                      scheduler/scheduler_config.json, pyoco_package.json (text-encoder reference, noise
                      prior, sample size, lineage)
    pyoco_config.yaml the resolved pyoco config of the run that produced it

    model = mlflow.pyfunc.load_model("models:/pyoco-video@champion")
    videos = model.predict(["a red circle moves to the left"], params={"frames": 8, "seed": 0})
    videos.shape, videos.dtype  # (1, 8, H, W, 3) uint8

The loaded model needs the ``pyoco`` package installed (it is not vendored into the model: a process
that already imported pyoco would otherwise mix two copies).
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

from pyoco.errors import InputError

PARAM_NAMES = ("frames", "steps", "guidance", "seed", "noise", "alpha", "height", "width", "eta")


def prompts_from_input(model_input: Any) -> list[str]:
    """Prompts from what pyfunc hands us: a DataFrame with a ``prompt`` column, a list, an array or a str."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # pandas DataFrame (schema enforcement turns lists into one)
        col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        values = model_input[col].tolist()
    elif hasattr(model_input, "tolist"):
        values = model_input.tolist()
    else:
        values = list(model_input)
    prompts = [str(v) for v in (v[0] if isinstance(v, list | tuple) and len(v) == 1 else v for v in values)]
    if not prompts:
        raise InputError("predict needs at least one prompt")
    return prompts


class PyocoVideoModel(PythonModel):
    """``predict(prompts, params={frames, steps, guidance, seed, noise, alpha, height, width, eta})`` ->
    uint8 videos (N, T, H, W, 3). Unset params come from the model's pyoco_package.json."""

    def load_context(self, context) -> None:
        from pyoco.package import load_package

        self.package = load_package(context.artifacts["package"])
        self.text_encoder = self.package.text_encoder()

    def defaults(self) -> dict[str, Any]:
        info = self.package.info
        return {
            "frames": int(info.num_frames),
            "steps": 20,
            "guidance": 3.0,
            "seed": 0,
            "noise": str(info.noise["kind"]),
            "alpha": float(info.noise["alpha"]),
            "height": int(info.height),
            "width": int(info.width),
            "eta": 0.0,
        }

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        from pyoco.sampling import generate

        p = self.defaults()
        unknown = sorted(set(params or {}) - set(PARAM_NAMES))
        if unknown:
            raise InputError(f"unknown predict params {unknown}; expected some of {list(PARAM_NAMES)}")
        p.update({k: v for k, v in (params or {}).items() if v is not None})
        prompts = prompts_from_input(model_input)
        prior = self.package.prior(str(p["noise"]), float(p["alpha"]))
        videos = generate(
            self.package.denoiser,
            self.text_encoder,
            prompts,
            prior=prior,
            num_frames=int(p["frames"]),
            height=int(p["height"]),
            width=int(p["width"]),
            steps=int(p["steps"]),
            guidance=float(p["guidance"]),
            seed=int(p["seed"]),
            eta=float(p["eta"]),
            scheduler_config=self.package.scheduler_config,
            vae=self.package.vae,
        )
        return videos.numpy()


mlflow.models.set_model(PyocoVideoModel())
