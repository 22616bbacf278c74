"""Few-shot segmentation models: the SVF paper's ``baseline``, ``PFENet`` and ``BAM``.

All three share the same encoder (``FewShotModel.encode``), as in PFENet and BAM:
- query and support images go through the backbone; support layer4 sees layer3 * foreground mask;
- mid-level features = concat(layer3, layer2) -> 1x1 conv to ``reduce_dim`` + ReLU + Dropout(0.5)
  (separate convs for query and support);
- support prototype = masked average pooling of the support features over the foreground;
- prior mask = PFENet's max cosine similarity between query and masked support layer4 features.

Call: ``model(query_img, support_imgs, support_masks, query_mask=None)`` with shapes (B,3,H,W), (B,K,3,H,W),
(B,K,H,W) (masks in {0,1,255}; supports and masks of batch 1: one support set for all B queries). In training
mode with ``query_mask`` it returns ``(logits, loss)``; otherwise logits (B, 2, H, W) at the input resolution.
BAM's training call also takes ``class_id`` (see ``BAM``). Losses are cross-entropy with ignore index 255;
auxiliary losses are added with the explicit weight ``aux_loss_weight``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset.splits import IGNORE_LABEL

from .backbones import STAGES
from .layers import ASPP, FrozenInEval, capped_bin, gram_matrix, masked_average_pooling, prior_mask, resize

__all__ = ["FewShotModel", "MetaLearner", "Baseline", "PFENet", "BAM"]


def _conv_relu(in_c, out_c, k=1):
    return nn.Sequential(nn.Conv2d(in_c, out_c, k, padding=k // 2, bias=False), nn.ReLU(inplace=True))


def _two_conv3x3(dim):
    return nn.Sequential(_conv_relu(dim, dim, 3), _conv_relu(dim, dim, 3))


def _classifier(dim, classes=2):
    return nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                         nn.Dropout2d(p=0.1), nn.Conv2d(dim, classes, 1))


def _ce(logits, target):
    return F.cross_entropy(logits, target.long(), ignore_index=IGNORE_LABEL)


class FewShotModel(FrozenInEval):
    """Backbone + the shared query/support encoder. The backbone is never trained here except its singular
    values under SVF; its BatchNorm stays in eval mode through ``train()``."""

    def __init__(self, backbone, reduce_dim=256, aux_loss_weight=1.0):
        super().__init__()
        self.backbone = backbone
        fea_dim = backbone.channels["layer3"] + backbone.channels["layer2"]
        self.down_query = nn.Sequential(nn.Conv2d(fea_dim, reduce_dim, 1, bias=False), nn.ReLU(inplace=True),
                                        nn.Dropout2d(p=0.5))
        self.down_supp = nn.Sequential(nn.Conv2d(fea_dim, reduce_dim, 1, bias=False), nn.ReLU(inplace=True),
                                       nn.Dropout2d(p=0.5))
        self.reduce_dim = reduce_dim
        self.aux_loss_weight = float(aux_loss_weight)
        self.eval_modules = ("backbone",)  # kept in eval mode by train() (FrozenInEval)

    @staticmethod
    def _mid_level(f2, f3):
        if f2.shape[-2:] != f3.shape[-2:]:  # VGG: layer2 is at stride 8, layer3 at 16
            f2 = resize(f2, f3.shape[-2:])
        return torch.cat([f3, f2], 1)

    def encode(self, query_img, support_imgs, support_masks):
        """Features of one batch of episodes: a dict with ``query`` (B,C,h,w) reduced query features,
        ``prototypes`` (B,K,C,1,1), ``priors`` (B,K,1,h,w), and the backbone outputs ``query_layers`` /
        ``support_layers`` (lists of 5; support ones with the shots flattened into the batch: B*K). Supports (and
        masks) of batch 1 with B > 1 queries are one support set shared by every query (predict.py): the backbone
        encodes it once and its features are repeated, which gives what B copies of it would."""
        if support_imgs.dim() != 5 or support_masks.dim() != 4 or query_img.dim() != 4:
            raise ValueError(f"expected query (B,3,H,W), supports (B,K,3,H,W), support masks (B,K,H,W); got "
                             f"{tuple(query_img.shape)}, {tuple(support_imgs.shape)}, {tuple(support_masks.shape)}")
        b, k = query_img.shape[0], support_imgs.shape[1]
        fg = (support_masks == 1).to(query_img.dtype).unsqueeze(2)  # (B,K,1,H,W); 255 counts as background
        q = self.backbone(query_img)
        if support_imgs.shape[0] == 1 and b > 1:  # one support set for every query: the backbone runs on it once
            s = [t.repeat(b, *[1] * (t.dim() - 1)) for t in self.backbone(support_imgs[0], layer4_mask=fg[0])]
            fg = fg.expand(b, *fg.shape[1:])
        else:
            s = self.backbone(support_imgs.flatten(0, 1), layer4_mask=fg.flatten(0, 1))
        query = self.down_query(self._mid_level(q[2], q[3]))
        # one shot at a time, in shot order, as the released code: with Dropout2d in training its masks are drawn
        # in the released order (one batch of all shots would draw them at once, episode by episode)
        mid = self._mid_level(s[2], s[3])
        mid = mid.reshape(b, k, *mid.shape[1:])
        supp = torch.stack([self.down_supp(mid[:, i]) for i in range(k)], 1).flatten(0, 1)
        prototypes = masked_average_pooling(supp, resize(fg.flatten(0, 1), supp.shape[-2:]))
        s4 = s[4].reshape(b, k, *s[4].shape[1:])
        priors = torch.stack([resize(prior_mask(q[4], s4[:, i], fg[:, i]), query.shape[-2:])
                              for i in range(k)], 1)  # one shot at a time: the similarity is (h*w)^2 per image
        return {"query": query, "prototypes": prototypes.reshape(b, k, *prototypes.shape[1:]), "priors": priors,
                "query_layers": q, "support_layers": s}

    def _output(self, query_img, query_mask, logits, aux_logits=()):
        """Upsample to the input size; in training with a mask also return main + weight * mean(aux) loss.
        Each term is kept, detached, in ``self.loss_terms`` ({"main": ..., "aux1": ...}) for the training log."""
        logits = resize(logits, query_img.shape[-2:])
        if not (self.training and query_mask is not None):
            return logits
        loss = _ce(logits, query_mask)
        self.loss_terms = {"main": loss.detach()}
        if aux_logits:
            aux = sum(_ce(resize(a, query_img.shape[-2:]), query_mask) for a in aux_logits) / len(aux_logits)
            self.loss_terms["aux1"] = aux.detach()
            loss = loss + self.aux_loss_weight * aux
        return logits, loss


class MetaLearner(nn.Module):
    """BAM's meta-learner head: merge (query, prototype, prior) -> ASPP -> 1x1 -> residual 2x3x3 -> classifier."""

    def __init__(self, reduce_dim=256):
        super().__init__()
        self.init_merge = _conv_relu(reduce_dim * 2 + 1, reduce_dim)
        self.aspp = ASPP(reduce_dim)
        self.res1 = _conv_relu(reduce_dim * 5, reduce_dim)
        self.res2 = _two_conv3x3(reduce_dim)
        self.cls = _classifier(reduce_dim)

    def forward(self, query, prototype, prior):
        x = self.init_merge(torch.cat([query, prototype.expand_as(query), prior], 1))
        x = self.res1(self.aspp(x))
        return self.cls(self.res2(x) + x)


class Baseline(FewShotModel):
    """The SVF paper's baseline: BAM's meta-learner alone. K shots: the SVF code's model/aspp.py weights every
    shot by 1 (BAM's reweighting with ``weight_soft = ones``), so the prototype and the prior are the *sums*
    over the shots, not means (identical at 1 shot)."""

    def __init__(self, backbone, reduce_dim=256, aux_loss_weight=1.0):
        super().__init__(backbone, reduce_dim, aux_loss_weight)
        self.meta = MetaLearner(reduce_dim)

    def forward(self, query_img, support_imgs, support_masks, query_mask=None):
        f = self.encode(query_img, support_imgs, support_masks)
        logits = self.meta(f["query"], f["prototypes"].sum(1), f["priors"].sum(1))
        return self._output(query_img, query_mask, logits)


class PFENet(FewShotModel):
    """PFENet: prior + feature enrichment over ``pyramid_bins`` with an auxiliary classifier per scale.

    Bins are absolute pooled sizes (PFENet's 60, 30, 15, 8 for 60x60 features) capped by the feature size
    (``layers.capped_bin``): exact PFENet at 473/641 inputs, still defined at small ones. The auxiliary
    loss is the mean over scales, weighted by ``aux_loss_weight`` (PFENet: 1.0)."""

    def __init__(self, backbone, reduce_dim=256, pyramid_bins=(60, 30, 15, 8), aux_loss_weight=1.0):
        super().__init__(backbone, reduce_dim, aux_loss_weight)
        self.pyramid_bins = tuple(int(b) for b in pyramid_bins)
        if not self.pyramid_bins or min(self.pyramid_bins) < 1:
            raise ValueError(f"pyramid_bins must be positive pooled sizes, got {pyramid_bins!r}")
        n = len(self.pyramid_bins)
        self.init_merge = nn.ModuleList(_conv_relu(reduce_dim * 2 + 1, reduce_dim) for _ in range(n))
        self.alpha_conv = nn.ModuleList(_conv_relu(reduce_dim * 2, reduce_dim) for _ in range(n - 1))
        self.beta_conv = nn.ModuleList(_two_conv3x3(reduce_dim) for _ in range(n))
        self.inner_cls = nn.ModuleList(_classifier(reduce_dim) for _ in range(n))
        self.res1 = _conv_relu(reduce_dim * n, reduce_dim)
        self.res2 = _two_conv3x3(reduce_dim)
        self.cls = _classifier(reduce_dim)

    def forward(self, query_img, support_imgs, support_masks, query_mask=None):
        f = self.encode(query_img, support_imgs, support_masks)
        query, prototype, prior = f["query"], f["prototypes"].mean(1), f["priors"].mean(1)
        size = query.shape[-2:]
        pyramid, aux = [], []
        for i, b in enumerate(self.pyramid_bins):
            bin_hw = capped_bin(b, size)
            q = F.adaptive_avg_pool2d(query, bin_hw)
            x = self.init_merge[i](torch.cat([q, prototype.expand_as(q), resize(prior, bin_hw)], 1))
            if i > 0:  # top-down path: the previous (finer) scale's features enrich this one
                x = self.alpha_conv[i - 1](torch.cat([x, resize(pyramid[-1], bin_hw)], 1)) + x
            x = self.beta_conv[i](x) + x
            aux.append(self.inner_cls[i](x))
            pyramid.append(resize(x, size))
        x = self.res1(torch.cat(pyramid, 1))
        logits = self.cls(self.res2(x) + x)
        return self._output(query_img, query_mask, logits, aux)


class BAM(FewShotModel):
    """BAM: frozen base learner (stage-1 PSPNet head on the same backbone) + meta-learner + learned ensemble.

    - K-shot: BAM's reweighting of the shots by the Gram-matrix distance between query and support layer2
      features (``kshot_rw``: 1x1 convs shot -> 2 -> shot on the sorted distances, softmax).
    - Gram adjustment: ``gram_merge`` (1x1, init [1, 0]) mixes each meta probability map with the distance.
    - Ensemble: ``cls_merge`` (1x1, init [1, 0]) mixes the adjusted meta background with the base learner's
      "any base class" map. In training, BAM removes the episode's own class from that map, so training
      needs ``class_id`` (the episode's 1-based global class id, as the dataset gives it) and the model's
      ``base_class_ids`` (global ids of the base learner's classes 1..n in order).
    - Loss: CE(final) + aux_loss_weight * CE(meta). BAM's second auxiliary loss (the frozen base learner against
      the query's base-class labels, ``base_label``) carries no gradient, so it is not optimised; given
      ``base_label`` it is computed and kept in ``loss_terms["aux2"]`` (the released log's total adds it).
    - Training mode (``base_learner_dropout``, default, as released: ``model.train()`` then only BatchNorm
      frozen): the base learner's Dropout2d(0.1) is active in training although its weights never change;
      False keeps the whole base learner in eval mode.
    - With SVF (``set_base_backbone``): the base learner reads the original stage-1 backbone's layer4, without
      gradients, as in the released BAM+SVF (its ``layer0p``-``layer4p``), not the SVF backbone whose singular
      values train. ``base_backbone`` is a frozen plain copy; layer0/1 of the SVF backbone are frozen and exact,
      so their output is reused (``base_shared_stages`` = 2) and only layer2-4 run a second time, under
      ``no_grad``. A converted released checkpoint sets it to 0 when its SVF stem was truncated.
    """

    def __init__(self, backbone, base_learner, shot=1, reduce_dim=256, aux_loss_weight=1.0, base_class_ids=None,
                 base_learner_dropout=True):
        super().__init__(backbone, reduce_dim, aux_loss_weight)
        self.base_learner = base_learner
        self.base_learner.requires_grad_(False)
        if base_learner_dropout:  # the released fix_bn: BatchNorm in eval mode, Dropout follows train()
            self.bn_eval_modules = ("base_learner",)
        else:
            self.eval_modules = ("backbone", "base_learner")
        self.meta = MetaLearner(reduce_dim)
        self.gram_merge = nn.Conv2d(2, 1, 1, bias=False)
        self.cls_merge = nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():
            self.gram_merge.weight.copy_(torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1))
            self.cls_merge.weight.copy_(torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1))
        self.shot = int(shot)
        if self.shot > 1:
            self.kshot_rw = nn.Sequential(nn.Conv2d(self.shot, 2, 1), nn.ReLU(inplace=True),
                                          nn.Conv2d(2, self.shot, 1))
        # global class id -> base learner label (1..n); -1 for classes the base learner does not know
        lookup = torch.full((256,), -1, dtype=torch.long)
        if base_class_ids is not None:
            lookup[torch.as_tensor(list(base_class_ids), dtype=torch.long)] = torch.arange(1, len(base_class_ids) + 1)
        self.register_buffer("base_label_of_class", lookup, persistent=False)
        self.has_base_class_ids = base_class_ids is not None
        self.base_backbone = None

    def set_base_backbone(self, backbone, shared_stages=2):
        """Make the base learner read ``backbone`` (the plain stage-1 backbone, frozen here) instead of the
        few-shot backbone; its first ``shared_stages`` stages are taken from the few-shot backbone's output."""
        self.base_backbone = backbone.requires_grad_(False)
        self.register_buffer("base_shared_stages", torch.tensor(int(shared_stages)))
        self.eval_modules = tuple(dict.fromkeys(self.eval_modules + ("base_backbone",)))
        return self

    @torch.no_grad()
    def _base_features(self, query_img, query_layers):
        """The layer4 features the base learner reads (no gradient flows back through them)."""
        if self.base_backbone is None:
            return query_layers[4]
        shared = int(self.base_shared_stages)
        if shared == 0:  # from the image (every backbone; a ViT's features are not its next stage's input)
            return self.base_backbone(query_img)[4]
        x = query_layers[shared - 1]
        for stage in STAGES[shared:]:
            x = getattr(self.base_backbone, stage)(x)
        return x

    def _shot_weights(self, query_low, support_low, b, k):
        """(weights (B,K,1,1) summing to 1, Gram distance (B,1,1,1)) from BAM's K-shot reweighting."""
        query_gram = gram_matrix(query_low)
        norm_max = float(query_gram.shape[1])  # ||ones(C, C)||_F = C
        support_gram = gram_matrix(support_low).reshape(b, k, *query_gram.shape[1:])
        distance = (query_gram.unsqueeze(1) - support_gram).norm(dim=(2, 3)).reshape(b, k, 1, 1) / norm_max
        if k > 1:
            sorted_distance, order = distance.sort(1)
            weight = self.kshot_rw(sorted_distance).gather(1, order.sort(1)[1])
            weight = torch.softmax(weight, 1)
        else:
            weight = torch.ones_like(distance)
        return weight, (weight * distance).sum(1, True)

    def forward(self, query_img, support_imgs, support_masks, query_mask=None, class_id=None, base_label=None):
        b, k = query_img.shape[0], support_imgs.shape[1]  # supports may be one set for every query (encode)
        if k != self.shot:
            raise ValueError(f"this BAM model was built for shot={self.shot} (its K-shot reweighting has {self.shot} "
                             f"inputs) but got {k} support images; build it with shot={k}")
        f = self.encode(query_img, support_imgs, support_masks)
        q_layers, s_layers = f["query_layers"], f["support_layers"]
        q_low, s_low = q_layers[2], s_layers[2]
        if q_low.shape[-2:] != q_layers[3].shape[-2:]:  # VGG: BAM resizes layer2 to layer3's size first
            q_low, s_low = resize(q_low, q_layers[3].shape[-2:]), resize(s_low, s_layers[3].shape[-2:])
        weight, distance = self._shot_weights(q_low, s_low, b, k)  # (B,K,1,1), (B,1,1,1)
        prior = (weight.unsqueeze(2) * f["priors"]).sum(1)
        prototype = (weight.unsqueeze(2) * f["prototypes"]).sum(1)
        # the base learner before the meta-learner's ASPP and classifier, as in the released forward: in training
        # their Dropout2d masks (base_learner_dropout) are then drawn in the released order
        base_out = self.base_learner(self._base_features(query_img, q_layers))
        meta_out = self.meta(f["query"], prototype, prior)
        if base_out.shape[-2:] != meta_out.shape[-2:]:
            base_out = resize(base_out, meta_out.shape[-2:])

        meta_prob, base_prob = meta_out.softmax(1), base_out.softmax(1)
        base_map = base_prob[:, 1:].sum(1, True)  # probability of "some base class" = not background here
        training_step = self.training and query_mask is not None
        if training_step:  # the episode's class is a base class: it must not count against the foreground
            if class_id is None or not self.has_base_class_ids:
                raise ValueError("BAM training needs class_id=<episode class ids, 1-based> in forward and a model "
                                 "built with base_class_ids (build_model does this from benchmark/fold), to remove "
                                 "the episode's class from the base learner's map as BAM does")
            label = self.base_label_of_class[torch.as_tensor(class_id, device=query_img.device).long().reshape(b)]
            if (label < 1).any():
                raise ValueError(f"class_id {class_id!r} holds a class the base learner was not trained on")
            base_map = base_map - base_prob.gather(1, label.reshape(b, 1, 1, 1).expand(-1, 1, *base_prob.shape[-2:]))
        distance_map = distance.expand_as(meta_prob[:, :1])
        meta_bg = self.gram_merge(torch.cat([meta_prob[:, :1], distance_map], 1))
        meta_fg = self.gram_merge(torch.cat([meta_prob[:, 1:], distance_map], 1))
        final_bg = self.cls_merge(torch.cat([meta_bg, base_map], 1))
        final_out = torch.cat([final_bg, meta_fg], 1)

        out = self._output(query_img, query_mask if training_step else None, final_out)
        if not training_step:
            return out
        aux1 = _ce(resize(meta_out, query_img.shape[-2:]), query_mask)
        self.loss_terms["aux1"] = aux1.detach()
        if base_label is not None:  # no gradient: the base learner and its input are frozen
            with torch.no_grad():
                self.loss_terms["aux2"] = _ce(resize(base_out, query_img.shape[-2:]), base_label)
        return out[0], out[1] + self.aux_loss_weight * aux1
