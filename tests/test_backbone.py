"""The backbone: real ImageNet weights from the offline package, loaded strictly; other timm names."""

import pytest
import torch
from PIL import Image
from skimage import data

from mlvision.backbone import BackboneConfig, create_backbone, default_target_modules, make_preprocess
from mlvision.errors import UnknownNameError

TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967


@pytest.fixture(scope="module")
def imagenet_model():
    config = BackboneConfig("tf_efficientnet_lite0", image_size=224)
    model = create_backbone(config, with_classifier=True)
    return model, make_preprocess(config, model)


def test_packaged_weights_recognise_a_cat_and_an_espresso(imagenet_model):
    model, preprocess = imagenet_model
    with torch.inference_mode():
        probs = model(preprocess([Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())])).softmax(-1)
    assert probs[0].argmax().item() in {TABBY, TIGER_CAT, EGYPTIAN_CAT}
    assert probs[0, [TABBY, TIGER_CAT, EGYPTIAN_CAT]].sum() > 0.8
    assert probs[1].argmax().item() == ESPRESSO and probs[1, ESPRESSO] > 0.8


def test_feature_extractor_and_preprocessing():
    config = BackboneConfig(image_size=48)
    model = create_backbone(config)
    preprocess = make_preprocess(config, model)
    assert preprocess.mean == (0.5, 0.5, 0.5) and preprocess.interpolation == "bicubic"
    images = preprocess([Image.new("L", (28, 28), 255), Image.new("RGBA", (10, 70))])
    assert images.shape == (2, 3, 48, 48)
    assert torch.allclose(images[0], torch.ones_like(images[0]))  # white -> (1 - 0.5) / 0.5
    with torch.inference_mode():
        assert model(images).shape == (2, 1280)


def test_any_timm_name_with_random_weights():
    config = BackboneConfig("vit_tiny_patch16_224", weights="random", image_size=32)
    model = create_backbone(config)
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 192)
    assert default_target_modules(config.name) == ["qkv", "proj", "fc1", "fc2"]


def test_unknown_backbone_names_the_problem():
    with pytest.raises(UnknownNameError, match="unknown backbone 'resnet_9000'"):
        create_backbone(BackboneConfig("resnet_9000"))
