"""From PyTorch: a MobileNetV3-shaped classifier with a dropout head -> edge-quq bundle -> `edge-quq predict`.

    python examples/from_pytorch.py [OUT]   (the [export-torch] extra, Debian's dataset-fashion-mnist; with
                                             EDGE_QUQ_ONNX2TF set, onnx2tf adds the int8 TFLite backbone)
Plain torch: torchvision does not import against this workplace's CPU torch (docs/export.md).
"""
import subprocess, sys
import cv2, numpy as np, torch, torch.nn as nn
from edge_quq_export import from_torch
from edge_quq_export.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

out = sys.argv[1] if len(sys.argv) > 1 else "bundles/fmnist-torch"
rgb64 = lambda a: np.stack([cv2.cvtColor(cv2.resize(im, (64, 64)), cv2.COLOR_GRAY2RGB) for im in a])
(x, y), (xt, yt) = load_fashion_mnist("train"), load_fashion_mnist("test")
x, y, xt, yt = rgb64(x[:4096]), torch.from_numpy(y[:4096].astype(np.int64)), rgb64(xt[:300]), yt[:300]
mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # ImageNet's, as torchvision's
tensor = lambda a: torch.from_numpy(((a / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2).copy())
block = lambda i, o: nn.Sequential(nn.Conv2d(i, i, 3, 2, 1, groups=i, bias=False), nn.BatchNorm2d(i), nn.Hardswish(),
                                   nn.Conv2d(i, o, 1, bias=False), nn.BatchNorm2d(o), nn.Hardswish())
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(), block(16, 24),
                    block(24, 32), block(32, 48), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                    nn.Linear(48, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, 10))  # MobileNetV3's classifier
opt = torch.optim.Adam(net.parameters(), lr=3e-3)
for step in range(80):  # a few steps: enough to be well above chance, not a good model
    i = torch.randint(0, len(x), (64,))
    loss = nn.functional.cross_entropy(net(tensor(x[i.numpy()])), y[i])
    opt.zero_grad(); loss.backward(); opt.step()

model = nn.Sequential(net, nn.Softmax(-1)).eval()  # the bundle's head ends in the model's own output activation
bundle = from_torch(model, tensor(xt[:2]), out, x[:256], test_data=xt, test_labels=yt, mean=tuple(mean),
                    std=tuple(std), classes=FASHION_MNIST_CLASSES, force=True)
print("accuracy:", bundle.manifest["accuracy"])
print("TFLite backbone:", bundle.manifest.get("backbone_converter") or bundle.manifest["backbone_note"])
cv2.imwrite(f"{out}-test0.png", xt[0][:, :, ::-1])  # OpenCV writes BGR; the bundle feeds the model RGB
subprocess.run([sys.executable, "-m", "edge_quq", "predict", f"{out}-test0.png", "--bundle", out], check=True)
