import pytest
import torch

from dreambooth_ray import models, tiny
from dreambooth_ray.settings import S3Settings


def test_tiny_tokenizer_is_a_real_bpe(tmp_path):
    from transformers import CLIPTokenizer

    tiny.write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.convert_ids_to_tokens(tok("a sks dog").input_ids)[1:-1] == ["a</w>", "sks</w>", "dog</w>"]
    # Words outside the small vocabulary fall back to byte-level pieces, never to <unk>.
    pieces = tok.convert_ids_to_tokens(tok("xyzzy").input_ids)[1:-1]
    assert len(pieces) > 1 and tok.unk_token not in pieces


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe")
    tiny.build_pipeline(seed=7).save_pretrained(path)
    return path


def _weights(pipe):
    return torch.cat([p.flatten() for p in pipe.unet.parameters()])


def test_load_from_local_folder_and_from_s3(saved_pipeline, s3_endpoint, bucket, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("DREAMBOOTH_RAY_CACHE", str(tmp_path / "cache"))
    local = models.load_pipeline(str(saved_pipeline))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.put(str(saved_pipeline) + "/", f"{bucket}/models/tiny7/", recursive=True)
    s3 = S3Settings(endpoint_url=s3_endpoint)
    remote = models.load_pipeline(f"s3://{bucket}/models/tiny7", s3)
    assert torch.equal(_weights(local), _weights(remote))
    parts = models.load_components(f"s3://{bucket}/models/tiny7", s3)
    assert parts["noise_scheduler"].config.prediction_type == "epsilon"
    image = remote("a sks toy", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    # The identity keys the prior cache: it changes when the stored weights change.
    before = models.identity(f"s3://{bucket}/models/tiny7", s3)
    fs.pipe_file(f"{bucket}/models/tiny7/unet/config.json", fs.cat_file(f"{bucket}/models/tiny7/unet/config.json") + b" ")
    assert models.identity(f"s3://{bucket}/models/tiny7", s3) != before


def test_bad_model_locations_are_clear(tmp_path, s3_endpoint, bucket):
    with pytest.raises(models.ModelError, match="without model_index.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(models.ModelError, match="no model_index.json"):
        models.resolve(f"s3://{bucket}/nothing-here", S3Settings(endpoint_url=s3_endpoint))


def test_tiny_is_identical_everywhere():
    a, b = tiny.build_pipeline(), tiny.build_pipeline()
    assert torch.equal(_weights(a), _weights(b))


def test_identifier_warnings(tmp_path):
    from transformers import CLIPTokenizer

    tiny.write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert models.identifier_warnings(tok, "sks", "dog") == []
    [many] = models.identifier_warnings(tok, "xyzzyplugh", "dog")
    assert "tokens" in many and "xyzzyplugh" in many
    assert any("class noun" in w for w in models.identifier_warnings(tok, "dog", "dog"))
