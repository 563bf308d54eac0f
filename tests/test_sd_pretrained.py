"""A Stable-Diffusion-style pipeline folder as ``model.pretrained``: the tiny folder itself, resolving its
parts (with overrides, pixel-space folders and a remote copy), the VAE at the clip boundary, the latents
column, the pre-flight compatibility checks, and ``pyoco model init`` -> ``pyoco sample`` on it."""

from __future__ import annotations

import json
import shutil
import time

import av
import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.testing import assert_close
from typer.testing import CliRunner

from pipelines.cli import app
from pyoco import clips as clipfmt
from pyoco.config import ModelConfig
from pyoco.errors import InputError
from pyoco.model import TinyUNetConfig, build_unet2d, load_unet2d, load_vae
from pyoco.package import load_package, read_info
from pyoco.pretrained import check_compatible, resolve_pretrained
from pyoco.text import CLIPTextEncoder, load_text_encoder
from pyoco.vae import LatentEncoder, decode_frames, encode_frames, vae_factor, vae_identity
from tests.sd_tiny import CLIP_DIM, MAX_LENGTH, build_sd_pipeline, build_vae

runner = CliRunner()


def _frames(b=2, t=3, size=32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (b, t, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------- the folder
def test_tiny_folder_is_a_real_sd_pipeline(sd_pipeline, sd_pipeline_v, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_pipeline.path), local_files_only=True)
    unet, vae, clip = pipe.unet, pipe.vae, pipe.text_encoder
    assert len(unet.config.down_block_types) >= 3
    assert sum("CrossAttn" in b for b in unet.config.down_block_types) >= 1
    assert unet.config.cross_attention_dim == clip.config.hidden_size == CLIP_DIM
    assert vae.config.latent_channels == unet.config.in_channels == 4
    assert pipe.vae_scale_factor == vae_factor(vae) == 8
    ids = pipe.tokenizer("the red circle", padding="max_length", max_length=MAX_LENGTH)["input_ids"]
    assert len(ids) == MAX_LENGTH and ids[0] == pipe.tokenizer.bos_token_id
    sched = json.loads((sd_pipeline_v.path / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and pipe.scheduler.config.prediction_type == "epsilon"
    # The real SD pipeline runs on it end to end (2 steps): the folder is SD-shaped, not just named so.
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()

    start = time.perf_counter()
    again = build_sd_pipeline(tmp_path / "again")
    seconds = time.perf_counter() - start
    for part in ("unet", "vae", "text_encoder"):
        (a,) = (sd_pipeline.path / part).glob("*.safetensors")
        (b,) = (again.path / part).glob("*.safetensors")
        assert a.read_bytes() == b.read_bytes(), f"{part} is not deterministic"
    print(f"tiny SD folder built in {seconds:.2f} s (machine shared with other jobs)")


# ---------------------------------------------------------------------------------------------- resolve
def test_resolve_takes_every_part_from_the_one_folder(sd_pipeline, sd_pipeline_other_vae):
    root = str(sd_pipeline.path)
    spec = resolve_pretrained(ModelConfig(pretrained=root))
    assert spec.unet == root + "/unet" and spec.vae == root + "/vae" and spec.text_encoder == root
    assert (spec.text_dim, spec.text_len) == (CLIP_DIM, MAX_LENGTH) and spec.latent and spec.vae_factor == 8
    assert spec.pixel_multiple == 4 * 8 and spec.pixel_size == sd_pipeline.pixel_size == 32
    assert spec.scheduler_config["_class_name"] == "PNDMScheduler"
    check_compatible(spec, clip_text_dim=CLIP_DIM, height=32, width=64)

    unet, vae = load_unet2d(spec.unet), load_vae(spec.vae)
    enc = load_text_encoder(spec.text_encoder)
    assert isinstance(enc, CLIPTextEncoder) and (enc.dim, enc.max_length) == (CLIP_DIM, MAX_LENGTH)
    assert unet.config.cross_attention_dim == enc.dim and vae.config.latent_channels == 4

    other = str(sd_pipeline_other_vae.path)
    swapped = resolve_pretrained(ModelConfig(pretrained=root, vae=other, text_encoder="minilm"))
    assert swapped.vae == other + "/vae" and swapped.text_encoder == "minilm"
    assert (swapped.text_dim, swapped.text_len) == (384, 32)
    with pytest.raises(InputError, match=r"cross_attention_dim=32 != the text encoder's width 384"):
        check_compatible(swapped)


def test_pixel_space_folder_and_latent_unet_without_vae(tmp_path):
    pixel = tmp_path / "pixel"
    build_unet2d(TinyUNetConfig(sample_size=16)).save_pretrained(pixel / "unet")
    spec = resolve_pretrained(ModelConfig(pretrained=str(pixel)))
    assert spec.vae is None and spec.text_encoder == "minilm" and spec.text_dim == 384
    assert spec.pixel_size == 16 and spec.pixel_multiple == 2
    check_compatible(spec, clip_text_dim=384, height=16, width=16)
    tiny = resolve_pretrained(ModelConfig())
    assert tiny.unet is None and tiny.vae is None and tiny.pixel_multiple == 2

    latent = build_sd_pipeline(tmp_path / "novae", with_vae=False)
    with pytest.raises(InputError, match=r"unet.config.in_channels=4 is a latent model but there is no VAE"):
        resolve_pretrained(ModelConfig(pretrained=str(latent.path)))


@pytest.mark.parametrize("store", ["memory", "s3"])
def test_remote_folder_resolves_and_loads_through_the_cache(store, sd_pipeline, tmp_path, request):
    """The fsspec branch: fsspec's in-memory filesystem, and s3:// on a real moto server. Configs are read
    remotely; weights go through pyoco.model.localize's content-keyed cache."""
    if store == "s3":
        bucket = request.getfixturevalue("moto_s3").make_bucket("pyoco-sd")
        root = f"s3://{bucket}/models/sd"
    else:
        root = "memory://pyoco-sd"
    fs, path = fsspec.core.url_to_fs(root)
    fs.put(str(sd_pipeline.path) + "/", path + "/", recursive=True)
    try:
        spec = resolve_pretrained(ModelConfig(pretrained=root))
        assert spec.unet == root + "/unet" and spec.vae == root + "/vae" and spec.text_encoder == root
        assert spec.text_dim == CLIP_DIM and spec.scheduler_config["prediction_type"] == "epsilon"
        cache = tmp_path / "cache"
        vae = load_vae(spec.vae, cache_dir=cache)
        enc = load_text_encoder(spec.text_encoder, cache_dir=cache)
        unet = load_unet2d(spec.unet, cache_dir=cache)
        assert vae_identity(vae) == vae_identity(load_vae(sd_pipeline.path))
        assert enc.encode(["a red circle"])[0].shape == (1, MAX_LENGTH, CLIP_DIM)
        assert unet.config.cross_attention_dim == CLIP_DIM
    finally:
        fs.rm(path, recursive=True)


def test_preprocess_endpoint_setting_reaches_the_vae_and_text_loads(
    moto_s3, sd_pipeline, tmp_path, monkeypatch
):
    """``preprocess.s3_endpoint_url``, not the environment (pointed at a dead port here), tells the driver's
    resolve_text / latent_plan and the LatentStage / CaptionEmbedder actors where the folder is; what the
    actors get is the endpoint alone."""
    from s3fs import S3FileSystem

    from pipelines.preprocess.latents import LatentStage, latent_plan
    from pipelines.preprocess.stages import CaptionEmbedder
    from pyoco import storage
    from pyoco.config import PreprocessConfig
    from pyoco.pretrained import resolve_text
    from tests.conftest import free_port

    bucket = moto_s3.make_bucket("pyoco-sd-endpoint")
    root = f"s3://{bucket}/sd"
    S3FileSystem(endpoint_url=moto_s3.endpoint_url).put(
        str(sd_pipeline.path) + "/", f"{bucket}/sd/", recursive=True
    )
    dead = f"http://127.0.0.1:{free_port()}"
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(var, dead)
    monkeypatch.setenv("PYOCO_CACHE", str(tmp_path / "cache"))
    S3FileSystem.clear_instance_cache()  # no client made with the session's endpoint is reused
    try:
        cfg = PreprocessConfig(
            input=root, output=str(tmp_path / "out"), s3_endpoint_url=moto_s3.endpoint_url, latents=True,
            vae=root, text_encoder=root, size=sd_pipeline.pixel_size, num_frames=3,
        )  # fmt: skip
        options = storage.loader_options(storage.StorageOptions.from_env(cfg.s3_endpoint_url))
        assert options == {"endpoint_url": moto_s3.endpoint_url}  # no credentials: it is an actor argument
        with pytest.raises(Exception, match=dead):  # botocore's EndpointConnectionError: env only is dead
            resolve_text(cfg.text_encoder, cfg.text_max_length)
        assert resolve_text(cfg.text_encoder, 32, storage_options=options) == (root, CLIP_DIM, MAX_LENGTH)
        plan = latent_plan(cfg, options)
        assert plan.vae == root + "/vae" and plan.identity == vae_identity(load_vae(sd_pipeline.path))
        stage = LatentStage(vae=plan.vae, identity=plan.identity, keep_frames=True, storage_options=options)
        assert stage.encoder.identity == plan.identity
        embedder = CaptionEmbedder(root, MAX_LENGTH, storage_options=options)
        assert embedder.encoder.encode(["a red circle"])[0].shape == (1, MAX_LENGTH, CLIP_DIM)
        assert len(list((tmp_path / "cache" / "models").iterdir())) >= 3  # vae, text_encoder, tokenizer
    finally:
        S3FileSystem.clear_instance_cache()  # nor is a client made with the dead one


# ------------------------------------------------------------------------------------------------- VAE
@pytest.mark.parametrize("shift_factor", [None, 0.0609])
def test_encode_decode_frames_apply_scaling_and_shift(shift_factor):
    vae = build_vae(seed=3, scaling_factor=1.5305 if shift_factor else 0.18215, shift_factor=shift_factor)
    frames = _frames()
    z = encode_frames(vae, frames)
    assert z.shape == (2, 4, 3, 4, 4) and z.dtype == torch.float32
    # diffusers' pipelines: latents = (mode - shift_factor) * scaling_factor, per frame
    x1 = torch.from_numpy(frames[:, 1]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mode = vae.encode(x1).latent_dist.mode()
    expected = (mode - (shift_factor or 0.0)) * vae.config.scaling_factor
    assert_close(z[:, :, 1], expected, atol=1e-5, rtol=1e-5)

    out = decode_frames(vae, z)
    assert out.shape == frames.shape and out.dtype == torch.uint8
    with torch.no_grad():
        pixels = vae.decode(z[:, :, 1] / vae.config.scaling_factor + (shift_factor or 0.0)).sample
    ref = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(out[:, 1], ref)


def test_vae_identity_follows_config_and_weights(sd_pipeline, sd_pipeline_other_vae, tmp_path):
    vae = load_vae(sd_pipeline.path)
    ident = vae_identity(vae)
    assert ident.startswith("sha256:") and ident == vae_identity(load_vae(sd_pipeline.path))
    assert ident != vae_identity(load_vae(sd_pipeline_other_vae.path))  # same config, other weights
    vae.save_pretrained(tmp_path / "copy")
    assert vae_identity(load_vae(tmp_path / "copy")) == ident  # a copy of the folder is the same VAE
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 1e-3
    assert vae_identity(vae) != ident
    actor = LatentEncoder(str(sd_pipeline.path), dtype=torch.bfloat16, chunk_frames=2)
    assert actor.identity == ident and (actor.factor, actor.latent_channels) == (8, 4)
    frames = _frames(1)
    z16, z32 = actor(frames), encode_frames(load_vae(sd_pipeline.path), frames).numpy()
    assert z16.shape == z32.shape == (1, 4, 3, 4, 4) and z16.dtype == np.float32
    np.testing.assert_allclose(z16, z32, atol=0.05 * np.abs(z32).max())  # bf16 VAE: ~3 significant digits
    rescaled = build_vae(seed=0, scaling_factor=0.13025)
    assert vae_identity(rescaled) != vae_identity(build_vae(seed=0))  # config only


# ---------------------------------------------------------------------------------------- clip format
def _rows(n, *, latents=None, length=MAX_LENGTH, dim=CLIP_DIM):
    rng = np.random.default_rng(1)
    frames = _frames(n)
    rows = []
    for i in range(n):
        row = {
            "clip_id": f"c{i}",
            "source": "s",
            "key": f"k{i}",
            "clip_index": 0,
            "start_frame": 0,
            "num_frames": 3,
            "fps": 8.0,
            "height": 32,
            "width": 32,
            "frames": frames[i].tobytes(),
            "caption": "x",
            clipfmt.EMBEDDING: rng.standard_normal((length, dim)).astype(np.float32),
            clipfmt.MASK: [True] * 3 + [False] * (length - 3),
            "labels": None,
            "node_id": "n",
        }
        if latents is not None:
            row[clipfmt.LATENTS] = latents[i].numpy()
        rows.append(row)
    return rows, frames


def test_latents_column_round_trip(sd_pipeline, tmp_path):
    vae = load_vae(sd_pipeline.path)
    ident = vae_identity(vae)
    rows, frames = _rows(2)
    latents = encode_frames(vae, frames)
    rows, _ = _rows(2, latents=latents)
    uri = str(tmp_path / "clips" / "train" / "part-0.parquet")
    clipfmt.write_clip_table(rows, uri, vae_identity=ident)
    table = clipfmt.read_clips(str(tmp_path), "train")
    assert clipfmt.latents_info(table.schema) == ((4, 3, 4, 4), ident)
    assert pq.read_schema(uri).field(clipfmt.LATENTS).metadata[b"dtype"] == b"float16"
    back = clipfmt.latents_tensor(table)
    assert back.dtype == torch.float32 and back.shape == (2, 4, 3, 4, 4)
    # float16 storage: relative error <= 2**-11 per value (plus subnormal absolute error near 0)
    assert_close(back, latents, rtol=2**-11, atol=1e-7)
    raw = table.column(clipfmt.LATENTS).to_pylist()  # as a Ray Data batch hands them over
    assert torch.equal(clipfmt.latents_tensor(raw, (4, 3, 4, 4)), back)
    emb, mask = clipfmt.embedding_arrays(table)  # CLIP's width and length, read from the metadata
    assert emb.shape == (2, MAX_LENGTH, CLIP_DIM) and mask.shape == (2, MAX_LENGTH)
    assert clipfmt.embedding_shape(table.schema) == (MAX_LENGTH, CLIP_DIM)

    plain, _ = _rows(2, length=32, dim=384)  # MiniLM-shaped clips have no latents column
    clipfmt.write_clip_table(plain, str(tmp_path / "m" / "clips" / "train" / "p.parquet"))
    minilm = clipfmt.read_clips(str(tmp_path / "m"), "train")
    assert clipfmt.latents_info(minilm.schema) is None and clipfmt.embedding_shape(minilm.schema) == (32, 384)
    with pytest.raises(clipfmt.DataError, match="no latents column"):
        clipfmt.latents_tensor(minilm)
    with pytest.raises(clipfmt.DataError, match="vae_identity"):
        clipfmt.write_clip_table(rows, str(tmp_path / "x.parquet"))
    with pytest.raises(clipfmt.DataError, match="overflow float16"):
        clipfmt.latents_array(torch.full((1, 4, 1, 2, 2), 1e6))


# -------------------------------------------------------------------------------------------- compat
def test_compatibility_errors_name_both_values_and_fields(sd_pipeline, sd_pipeline_other_vae):
    spec = resolve_pretrained(ModelConfig(pretrained=str(sd_pipeline.path)))
    with pytest.raises(InputError) as err:
        check_compatible(spec, clip_text_dim=384)
    assert str(err.value) == (
        f"clips caption_embedding width 384 != the text encoder's width 32 "
        f"(model.text_encoder={sd_pipeline.path}); preprocess the data with that encoder"
    )
    with pytest.raises(
        InputError, match=r"^clips height 48 px is not divisible by 32 = UNet downsampling 4 "
    ):
        check_compatible(spec, height=48, width=32)
    ours = vae_identity(load_vae(sd_pipeline.path))
    theirs = vae_identity(load_vae(sd_pipeline_other_vae.path))
    check_compatible(spec, latents_vae_identity=ours, model_vae_identity=ours)
    with pytest.raises(
        InputError, match=r"latents were made by VAE sha256:\S+ \(latents vae_identity\)"
    ) as e:
        check_compatible(spec, latents_vae_identity=theirs, model_vae_identity=ours)
    assert theirs[:19] in str(e.value) and ours[:19] in str(e.value) and "\n" not in str(e.value)

    wide = resolve_pretrained(ModelConfig(pretrained=str(sd_pipeline.path), text_encoder="minilm"))
    with pytest.raises(InputError) as both:
        check_compatible(wide, clip_text_dim=384, height=36)
    msg = str(both.value)
    assert "unet.config.cross_attention_dim=32 != the text encoder's width 384" in msg
    assert "height 36 px" in msg and "\n" not in msg


# ------------------------------------------------------------------------------------ init and sample
@pytest.mark.parametrize("fixture", ["sd_pipeline", "sd_pipeline_v"])
def test_model_init_then_sample_on_a_latent_folder(fixture, request, tmp_path):
    sd = request.getfixturevalue(fixture)
    source = tmp_path / "source"
    shutil.copytree(sd.path, source)
    model = tmp_path / "model"
    init = runner.invoke(app, ["model", "init", "--out", str(model), "--pretrained", str(source)])
    assert init.exit_code == 0, init.output
    bad = runner.invoke(
        app,
        [
            "model",
            "init",
            "--out",
            str(tmp_path / "bad"),
            "--pretrained",
            str(source),
            "--text-encoder",
            "minilm",
        ],
    )
    assert bad.exit_code == 2 and not (tmp_path / "bad").exists()
    assert "cross_attention_dim=32 != the text encoder's width 384" in bad.output
    shutil.rmtree(source)  # the package must carry everything it samples with
    assert "(latent, 32x32 px, text encoder clip)" in " ".join(init.output.split())
    pkg = load_package(str(model))
    assert pkg.info.has_vae and pkg.info.height == pkg.info.width == sd.pixel_size
    assert pkg.info.vae_identity == vae_identity(load_vae(sd.path))
    assert read_info(model).text_encoder["path"] == "."  # inside the package, wherever it is copied
    assert pkg.info.text_encoder == {**read_info(model).text_encoder, "path": str(model)}
    assert pkg.scheduler_config["prediction_type"] == sd.prediction_type
    enc = pkg.text_encoder()  # from the package's own copy, not the source folder
    ref = load_text_encoder(str(sd.path))
    assert_close(enc.encode(["a red circle"])[0], ref.encode(["a red circle"])[0], atol=0, rtol=0)

    out = tmp_path / "clip.mp4"
    args = ["sample", "--model", str(model), "--prompt", "a red circle", "--out", str(out)]
    result = runner.invoke(app, [*args, "--frames", "3", "--steps", "2"])
    assert result.exit_code == 0, result.output
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (sd.pixel_size, sd.pixel_size, 3)
