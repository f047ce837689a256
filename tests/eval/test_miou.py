import math

import torch

from svq_fast.eval.miou import ConfusionMatrix


def test_miou_by_hand_with_ignore_and_absent_class():
    target = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 2]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    iou = cm.iou()
    # class 0: inter 1, union 2; class 1: inter 1, union 2; class 2: never seen (the ignore pixel does not count)
    assert iou[0] == 0.5 and iou[1] == 0.5 and math.isnan(iou[2]) and math.isnan(iou[3])
    assert cm.miou() == 0.5
    assert abs(cm.pixel_accuracy() - 2 / 3) < 1e-12
