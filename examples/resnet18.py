"""ResNet-18 in torchvision's layout (a torchvision state dict loads) as a qcompile model file.

ImageNet stem at 224x224 by default; `--model-arg stem=cifar` gives the 3x3 CIFAR stem at 32x32.
"""

from qcompile.models import resnet18

from torchvision_resnet import model_file

build_model, example_input = model_file(resnet18)
