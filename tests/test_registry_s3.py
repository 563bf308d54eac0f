"""The registry with artifacts on S3 (moto): the MLflow server stores the pyfunc model in the bucket
(--artifacts-destination s3://..., proxied), a package registered straight from s3:// works, and
``models:/NAME@champion`` resolves back to a loadable local package. No credential reaches MLflow."""

from __future__ import annotations

import pytest

from pipelines.registry.client import _client
from pipelines.registry.promote import promote
from pipelines.registry.register import register_model
from pipelines.registry.resolve import resolve_model_uri
from tests.conftest import TEST_AWS_SECRET, start_mlflow_server, stop

pytest_plugins = ("tests.fixtures_registry",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_register_and_resolve_with_s3_artifacts(moto_s3, tmp_path, tiny_package, monkeypatch):
    import boto3
    import fsspec

    from pyoco.package import load_package

    bucket = moto_s3.make_bucket("pyoco-registry")
    monkeypatch.setenv("PYOCO_CACHE", str(tmp_path / "cache"))
    # MLflow's server-side job runner (~10 huey processes) serves GenAI features we do not use and makes
    # the server take several times longer to start on 2 cores.
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    server = start_mlflow_server(tmp_path / "mlflow-s3", artifacts=f"s3://{bucket}/mlflow")
    try:
        uri = server.uri
        # the model package itself lives on S3 too (what training writes with an s3:// storage path)
        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": moto_s3.endpoint_url})
        fs.put(str(tiny_package) + "/", f"{bucket}/exports/model/", recursive=True)
        name = "pyoco-s3"
        result = register_model(
            name, checkpoint=f"s3://{bucket}/exports/model", metrics={"val_loss": 0.25}, tracking_uri=uri
        )
        assert (
            result["version"] == "1" and result["lineage"]["pyoco.source"] == f"s3://{bucket}/exports/model"
        )
        assert promote(name, tracking_uri=uri)["champion_version"] == "1"

        s3 = boto3.client("s3", endpoint_url=moto_s3.endpoint_url)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="mlflow/")["Contents"]]
        assert any(k.endswith("pyfunc/MLmodel") for k in keys)
        assert any(k.endswith("unet/diffusion_pytorch_model.safetensors") for k in keys)

        local = resolve_model_uri(f"models:/{name}@champion", tracking_uri=uri)
        pkg = load_package(local)
        assert pkg.info.num_frames == 4 and pkg.denoiser.is_video
        # cached: the same version resolves to the same folder without downloading again
        assert resolve_model_uri(f"models:/{name}/1", tracking_uri=uri) == local

        client = _client(uri)
        mv = client.get_model_version(name, "1")
        stored = " ".join([*mv.tags.values(), *client.get_registered_model(name).tags.values()])
        mlmodel = s3.get_object(Bucket=bucket, Key=next(k for k in keys if k.endswith("pyfunc/MLmodel")))
        assert TEST_AWS_SECRET not in stored
        assert TEST_AWS_SECRET not in mlmodel["Body"].read().decode()
    finally:
        stop(server.proc)
