"""The collapsed run of exercise 10 (course/README.md): byol.py stripped of what keeps BYOL from collapsing.

byol.py's own loop, log and monitors, every flag byol.py's, with these changes made here (not in byol.py): the
online predictor q is the identity (BYOL's ablations, §5, remove it too) and, with --strip-projector, so are the
projector and the target projector: the loss 2 - 2 cos compares the backbone's CLS features of the two views, the
feature the monitors (embed_std, knn_top1) measure. With --momentum 0 the target starts as the online network
itself (then follows byol.py's cosine schedule from 0 to 1). The log of course/collapsed_byol.jsonl came from

    python course/collapse_run.py --strip-projector --dataset folder --data-dir tests/data_sample \
        --arch vit_mini --patch-size 8 --epochs 8 --warmup-epochs 1 --batch-size 128 --workers 2 --knn-every 1 \
        --momentum 0 --device cpu --out runs/byol_collapse
    cp runs/byol_collapse/log.jsonl course/collapsed_byol.jsonl

(about 8 minutes on a busy 2-core CPU). The predictor removed alone (no --strip-projector, the default momentum
0.99, --hidden-dim 512 --out-dim 128, 10 epochs) did not collapse the backbone here: embed_std stayed at
0.045-0.050 while the loss fell from 1.55 to 0.55, so whatever collapsed there sat in the projector, where the
monitors do not look.
"""
import os
import sys

import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
import byol  # noqa: E402

_init = byol.BYOL.__init__


def _init_without_predictor(self, backbone, hidden_dim, out_dim):
    _init(self, backbone, hidden_dim, out_dim)
    self.predictor = nn.Identity()  # p = projector(backbone(x)): nothing left to keep the trivial solution away
    if STRIP_PROJECTOR:  # the loss on the backbone's CLS feature itself, which the monitors measure
        self.projector, self.target_projector = nn.Identity(), nn.Identity()


def _ema_update_skipping_empty(target, online, m):
    if list(target.parameters()):  # the stripped projector has no parameters to average
        _ema_update(target, online, m)


_ema_update = byol.ema_update
STRIP_PROJECTOR = "--strip-projector" in sys.argv
if STRIP_PROJECTOR:
    sys.argv.remove("--strip-projector")


if __name__ == "__main__":
    byol.BYOL.__init__ = _init_without_predictor
    byol.ema_update = _ema_update_skipping_empty
    print("course/collapse_run.py: byol.py with the online predictor removed (the identity)")
    byol.main()
