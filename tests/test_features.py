
import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import make_shapes

from graft.data.discovery import discover
from graft.models.backbones.registry import create_backbone
from graft.models.surgery import DEFAULT_NODE, cut
from graft.probing.cache import CacheSpace
from graft.probing.extraction import FeatureExtractor, extract_features


def _backbone():
    torch.manual_seed(0)
    return create_backbone("test_resnet", pretrained=False)


def _extract(splits, nodes, cache, **kwargs):
    backbone = _backbone()
    extractor = FeatureExtractor(backbone.net, nodes, kwargs.pop("pool", "avg"))
    return extract_features(splits, extractor, backbone.preprocessing.with_size(32), "test_resnet",
                            cache_dir=cache, workers=0, **kwargs)


@pytest.fixture()
def data(tmp_path):
    return make_shapes(tmp_path / "data", splits={"train": 6, "val": 3}, seed=4)


def test_second_run_reads_everything_from_the_cache(data, tmp_path):
    splits = discover(data)
    first = _extract(splits, ["layer2", DEFAULT_NODE], tmp_path / "cache")
    assert first["layer2"].stats["extracted"] == 27 and first["layer2"].stats["cached"] == 0
    second = _extract(splits, ["layer2", DEFAULT_NODE], tmp_path / "cache")
    assert second["layer2"].stats["extracted"] == 0 and second["layer2"].stats["cached"] == 27
    for node in ("layer2", DEFAULT_NODE):
        for split in ("train", "val"):
            assert np.array_equal(first[node].features[split], second[node].features[split])
    assert first[DEFAULT_NODE].dim == 96 and first["layer2"].dim == 48
    assert first["layer2"].features["train"].dtype == np.float16


def test_added_and_changed_files_are_the_only_ones_extracted(data, tmp_path):
    _extract(discover(data), ["layer3"], tmp_path / "cache")
    for index in range(10):
        Image.new("RGB", (48, 48), (index * 20, 0, 0)).save(data / "train" / "circle" / f"new{index}.png")
    Image.new("RGB", (48, 48), (0, 0, 0)).save(data / "val" / "square" / "000.png")  # rewritten: new size/mtime
    again = _extract(discover(data), ["layer3"], tmp_path / "cache")
    assert again["layer3"].stats["extracted"] == 11 and again["layer3"].stats["cached"] == 27 - 1


def test_cache_key_covers_weights_pooling_and_preprocessing(data, tmp_path):
    splits = discover(data)
    _extract(splits, ["layer2"], tmp_path / "cache")
    assert _extract(splits, ["layer2"], tmp_path / "cache", pool="avgmax")["layer2"].stats["cached"] == 0
    backbone = _backbone()
    with torch.no_grad():
        backbone.net.conv1[0].weight.add_(0.01)  # other weights → other features
    other = extract_features(splits, FeatureExtractor(backbone.net, ["layer2"]), backbone.preprocessing.with_size(32),
                             "test_resnet", cache_dir=tmp_path / "cache", workers=0)
    assert other["layer2"].stats["cached"] == 0
    resized = extract_features(splits, FeatureExtractor(_backbone().net, ["layer2"]),
                               _backbone().preprocessing.with_size(40), "test_resnet", cache_dir=tmp_path / "cache",
                               workers=0)
    assert resized["layer2"].stats["cached"] == 0


def test_a_crashed_runs_shard_is_never_read(data, tmp_path):
    splits = discover(data)
    _extract(splits, ["layer2"], tmp_path / "cache")
    (space,) = [p for p in (tmp_path / "cache").iterdir() if p.name != "onnx"]  # onnx/: the trunk's export
    index = CacheSpace(space, {}).read_index()
    (space / "shard-halfwritten.npy").write_bytes(b"\x93NUMPY garbage")  # a crash before the index update
    shard = next(iter(index["entries"].values()))[0]
    (space / shard).unlink()  # and an index entry whose shard is gone
    again = _extract(splits, ["layer2"], tmp_path / "cache")
    assert again["layer2"].stats["extracted"] == 27
    assert not list(space.glob(".graft-tmp-*"))  # no temp files left behind


def test_one_pass_equals_separate_cuts(data, tmp_path):
    splits = discover(data)
    together = _extract(splits, ["layer1", "layer3", DEFAULT_NODE], tmp_path / "a")
    for node in ("layer1", "layer3", DEFAULT_NODE):
        trunk, _ = cut(_backbone().net, None if node == DEFAULT_NODE else node, "avg", (32, 32))
        alone = extract_features(splits, trunk, _backbone().preprocessing.with_size(32), "test_resnet",
                                 cache_dir=tmp_path / node, workers=0)
        assert np.array_equal(together[node].features["val"], alone[node].features["val"]), node


def test_a_pruned_cut_reads_what_a_several_node_pass_cached(data, tmp_path):
    splits = discover(data)
    together = _extract(splits, ["layer2", DEFAULT_NODE], tmp_path / "cache")  # advise's pass over every stage
    trunk, _ = cut(_backbone().net, "layer2", "avg", (32, 32))  # what fit --cut-at layer2 extracts with: pruned
    alone = extract_features(splits, trunk, _backbone().preprocessing.with_size(32), "test_resnet",
                             cache_dir=tmp_path / "cache", workers=0)["layer2"]
    assert alone.stats["extracted"] == 0 and alone.stats["cached"] == 27
    assert np.array_equal(alone.features["val"], together["layer2"].features["val"])
    for module, cached in (("layer4.0.conv1", 27), ("conv1.0", 0)):  # one after layer2 cannot change its features
        backbone = _backbone()
        with torch.no_grad():
            backbone.net.get_submodule(module).weight.add_(0.5)
        again = extract_features(splits, FeatureExtractor(backbone.net, ["layer2"]),
                                 backbone.preprocessing.with_size(32), "test_resnet", cache_dir=tmp_path / "cache",
                                 workers=0)["layer2"]
        assert again.stats["cached"] == cached, module
        assert np.array_equal(again.features["val"], together["layer2"].features["val"]) == bool(cached)


def test_augmented_views_are_cached_and_reproducible(data, tmp_path):
    splits = discover(data)
    first = _extract(splits, ["layer2"], tmp_path / "cache", augment_views=2)["layer2"]
    assert len(first.augmented) == 2 and first.augmented[0].shape == first.features["train"].shape
    assert not np.array_equal(first.augmented[0], first.augmented[1])
    second = _extract(splits, ["layer2"], tmp_path / "cache", augment_views=2)["layer2"]
    assert second.stats["extracted"] == 0 and np.array_equal(first.augmented[1], second.augmented[1])


def test_concurrent_index_updates_keep_both_shards(tmp_path):
    space = CacheSpace(tmp_path / "space", {})
    space.add_shard(["a", "b"], np.ones((2, 3), np.float16))
    space.add_shard(["c"], np.zeros((1, 3), np.float16))
    found, missing = space.lookup(["a", "b", "c", "d"])
    assert missing == ["d"] and space.gather([found["b"], found["c"]]).tolist() == [[1, 1, 1], [0, 0, 0]]


def test_a_damaged_cache_index_is_rebuilt_not_fatal(tmp_path):
    import numpy as np

    from graft.probing.cache import CacheSpace

    space = CacheSpace(tmp_path / "space", {"node": "x"})
    space.add_shard(["a", "b"], np.ones((2, 3), np.float16))
    assert space.lookup(["a", "b"])[1] == []
    (tmp_path / "space" / "index.sqlite").write_text("{ half written")
    found, missing = space.lookup(["a", "b"])
    assert found == {} and missing == ["a", "b"]
    space.add_shard(["a"], np.zeros((1, 3), np.float16))
    assert list(space.lookup(["a"])[0]) == ["a"]


def test_eager_setting_is_measured_once_then_read_back_as_validated_data(tmp_path):
    """The measured (batch size, channels-last) is written to the cache folder and read back without measuring
    again; a file holding anything but a candidate setting is ignored and measured over."""
    import json

    from graft.probing.tuning import CANDIDATES, TUNING_FOLDER, eager_setting

    calls = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            calls.append(len(x))
            return self.conv(x).mean((2, 3))

    module = Counting()
    first = eager_setting(module, (16, 16), tmp_path, "net", "weights")
    assert first in CANDIDATES and calls  # measured: every candidate batch size ran
    assert set(calls) >= {batch for batch, _ in CANDIDATES}
    (written,) = (tmp_path / TUNING_FOLDER).glob("eager-*.json")
    assert (json.loads(written.read_text())["batch_size"], json.loads(written.read_text())["channels_last"]) == first
    calls.clear()
    written.write_text(json.dumps({"batch_size": 32, "channels_last": True}))
    assert eager_setting(module, (16, 16), tmp_path, "net", "weights") == (32, True) and not calls  # read back
    for bad in ({"batch_size": 7, "channels_last": True}, {"batch_size": "8", "channels_last": True},
                {"batch_size": True, "channels_last": True}, {"batch_size": 8, "channels_last": 1}, ["not", "an"]):
        written.write_text(json.dumps(bad))
        assert eager_setting(module, (16, 16), tmp_path, "net", "weights") in CANDIDATES and calls
        calls.clear()
    assert eager_setting(module, (16, 16), tmp_path, "other net", "weights") in CANDIDATES and calls  # its own file
    assert len(list((tmp_path / TUNING_FOLDER).glob("eager-*.json"))) == 2
