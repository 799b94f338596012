"""Typed, strict configuration of a largefr run.

Each section is a kw-only dataclass; the string literal right after a field is its documentation
(``field_docs`` reads it; a test checks that no field lacks one). Files are JSON or YAML; command
line overrides are ``KEY=VALUE`` with a dotted key and a YAML value (``head.margin=0.4``,
``data.val_targets=[lfw,cfp_fp]``). Unknown keys, wrong types and impossible values are all
reported at once in one ``ConfigError`` that names the file (or the override) and the key.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import json
import textwrap
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from largefr.choices import (
    AUGMENT_OPERATORS,
    AdaptiveMargin,
    BadImagePolicy,
    ContrastiveType,
    ElasticForm,
    FixedMargin,
    HeadInit,
    LoaderKind,
    LogitsDtype,
    NonFinitePolicy,
    OptimizerName,
    Precision,
    ScheduleType,
    ScheduleUnit,
    TemperatureMode,
    WeightDtype,
)
from largefr.config_loading import apply_overrides, build_section, convert_value, read_file, valid_keys
from largefr.config_validation import (
    ConfigError,
    Issue,
    config_issues,
    section_issues,
    world_size_issues,
)

__all__ = ["Config", "ConfigError", "load_config", "config_to_json", "field_docs", "config_classes"]


def _raise_if_any(issues: list[Issue]) -> None:
    if issues:
        raise ConfigError(issues)


@functools.cache
def _choice_fields(cls: type) -> dict[str, Any]:
    """The Literal[...] fields of `cls`: loading a file checks every type, construction from Python these."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is Literal}


class _Section:
    """Runs a section's value checks when it is constructed, from a file or from Python."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        issues: list[Issue] = []
        for name, hint in _choice_fields(type(self)).items():
            convert_value(getattr(self, name), hint, f"{self.section}.{name}", issues)
        _raise_if_any(issues + section_issues(self))


@dataclass(kw_only=True)
class SyntheticDataConfig(_Section):
    section: ClassVar[str] = "data.synthetic"
    identities: int = 200
    """Number of synthetic identities (classes) to generate for training."""
    images_per_identity: int = 24
    """Images generated per identity."""
    val_pairs: int = 400
    """Pairs in the generated verification file synth_val.bin (half same-identity, unseen ids)."""
    seed: int = 0
    """Seed of the generator: the same seed gives the same data set."""
    heldout_identities: int = 50
    """Identities of the labelled held-out folder synth_heldout/<identity>/<n>.jpg (in neither the training
    set nor synth_val's pairs), clustered by tools/ablate.py (the paper's Table 5); 0 = no folder."""
    heldout_images_per_identity: int = 10
    """Images per identity of the held-out folder; 0 = no folder."""
    cache_dir: str | None = None
    """Folder where the data set is generated once and then reused when ``data.rec`` is not set."""


@dataclass(kw_only=True)
class AugmentConfig(_Section):
    """Training augmentation (largefr/data/augment.py: order, sampling rules, DALI vs torch loader).

    Every operator is off by default (probability 0). Each training image draws, per operator in
    the fixed order of augment.OPERATORS, whether it applies (its *_prob) and then its parameters,
    uniformly in [low, high] unless said otherwise; seeded by (train.seed, epoch, rank), so a resumed
    run replays the same augmentations. The DALI and torch loaders draw from the same distributions
    (not bit-identical). Applied to training batches only, before the flip and the normalization.
    """

    section: ClassVar[str] = "data.augment"
    crop_prob: float = 0.0
    """Probability of a random resized crop: a box covering a random share of the image area
    (crop_scale) with a random aspect ratio width/height (crop_ratio, log-uniform) is cut out and
    resized back to data.image_size (bilinear); up to 10 draws, else the whole image."""
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])
    """[low, high] share of the image area the crop box covers, in (0, 1]."""
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    """[low, high] aspect ratio (width / height) of the crop box, > 0, drawn log-uniformly."""
    downscale_prob: float = 0.0
    """Probability of a low-resolution copy: resized down to a random side (downscale_range of
    data.image_size) and back up (bilinear); arcface_torch's dali_aug uses 0.1."""
    downscale_range: list[float] = field(default_factory=lambda: [0.5, 0.8])
    """[low, high] side of the low-resolution copy as a share of data.image_size, in (0, 1]
    (arcface_torch: 0.5-0.8)."""
    jitter_prob: float = 0.0
    """Probability of a color jitter: brightness and contrast (out = b * (128 + c * (in - 128))),
    then hue and saturation (the YIQ rotation and scaling DALI's hsv operator applies), each
    factor drawn in its range; arcface_torch's dali_aug uses 0.2 (hue and saturation only)."""
    brightness: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """[low, high] brightness multiplier of the jitter, >= 0 (1 = unchanged)."""
    contrast: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """[low, high] contrast multiplier of the jitter around 128, >= 0 (1 = unchanged, 0 = gray)."""
    saturation: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """[low, high] saturation multiplier of the jitter, >= 0 (1 = unchanged; arcface_torch: 1-1.2)."""
    hue: list[float] = field(default_factory=lambda: [0.0, 0.0])
    """[low, high] hue rotation of the jitter in degrees, within [-180, 180] (arcface_torch: 0-20)."""
    grayscale_prob: float = 0.0
    """Probability of a grayscale copy (luma 0.299 R + 0.587 G + 0.114 B in all three channels);
    arcface_torch's dali_aug uses 0.1."""
    blur_prob: float = 0.0
    """Probability of a Gaussian blur with sigma drawn in blur_sigma (window 2 * ceil(3 sigma) + 1,
    mirrored borders); arcface_torch's dali_aug uses 0.2."""
    blur_sigma: list[float] = field(default_factory=lambda: [0.8, 1.1])
    """[low, high] sigma of the blur in pixels, > 0 (arcface_torch's windows 3 and 5 are sigma 0.8 and 1.1)."""
    jpeg_prob: float = 0.0
    """Probability of a JPEG re-compression at a quality drawn in jpeg_quality (integers, both ends included)."""
    jpeg_quality: list[int] = field(default_factory=lambda: [30, 90])
    """[low, high] JPEG quality of the re-compression, within [1, 100]."""
    erase_prob: float = 0.0
    """Probability of random erasing (occlusion): one rectangle of a random share of the image area
    (erase_area) and aspect ratio (erase_ratio, log-uniform; a side longer than the image is cut to
    it), at a uniformly random place inside the image, filled with erase_fill."""
    erase_area: list[float] = field(default_factory=lambda: [0.02, 0.2])
    """[low, high] share of the image area of the erased rectangle, in (0, 1]."""
    erase_ratio: list[float] = field(default_factory=lambda: [0.3, 3.3])
    """[low, high] aspect ratio (width / height) of the erased rectangle, > 0, drawn log-uniformly."""
    erase_fill: list[int] = field(default_factory=lambda: [0, 0, 0])
    """[R, G, B] color (0-255) of the erased rectangle."""
    mask_prob: float = 0.0
    """Probability of a synthetic face-mask occlusion of the lower face: a centered rectangle from a
    random top edge (mask_top) to the bottom of the crop, of a random width (mask_width), filled
    with mask_fill (aligned 112x112 crops: nose tip at ~0.64 of the height, mouth at ~0.82)."""
    mask_top: list[float] = field(default_factory=lambda: [0.55, 0.7])
    """[low, high] top edge of the mask as a share of the image height, in [0, 1)."""
    mask_width: list[float] = field(default_factory=lambda: [0.7, 0.95])
    """[low, high] width of the mask as a share of the image width, in (0, 1]."""
    mask_fill: list[int] = field(default_factory=lambda: [170, 200, 225])
    """[R, G, B] color (0-255) of the mask (default: a pale surgical-mask blue)."""

    @property
    def enabled(self) -> bool:
        """True when any operator has a probability above 0."""
        return any(getattr(self, f"{name}_prob") > 0 for name in AUGMENT_OPERATORS)


@dataclass(kw_only=True)
class DataConfig(_Section):
    section: ClassVar[str] = "data"
    rec: str | list[str] | None = None
    """Folder holding train.rec, train.idx and property, in any layout insightface's tools write
    (faces_emore's header and identity records, or RecBuilder's images from key 0, property with a
    second line, train.meta); or a folder of shards train-00000.rec/.idx ... (tools/pack_rec.py), a
    .rec file, or a list of these read as one set (largefr/data/rec_set.py); one of data.rec /
    data.images is required unless data.loader is 'synthetic' or data.synthetic.cache_dir is set."""
    images: str | None = None
    """Folder of identity sub-folders of images (as arcface_torch's ImageFolder fallback reads: labels
    follow sorted folder names), packed once into shards under data.cache_dir (the shards from the first
    changed file on are packed again when a file is added, removed or changed); instead of data.rec."""
    cache_dir: str | None = None
    """Folder of the packed copy of data.images and of the scanned image indexes; null = $LARGEFR_CACHE,
    else ~/.cache/largefr (a scan of a writable data.rec is then written beside it)."""
    num_classes: int | None = None
    """Number of identities in the training set; null = read from the property file (else the largest
    label + 1). Given and different from the data: an error says which value is right."""
    num_images: int | None = None
    """Number of training images (sets the number of steps per epoch); null = counted by the scan of
    train.rec. Given and different from the data: an error says which value is right."""
    loader: LoaderKind = "dali"
    """'dali' (GPU or CPU DALI pipeline), 'torch' (DataLoader fallback, same outputs) or
    'synthetic' (random in-memory tensors, for benchmarks)."""
    val_targets: list[str] = field(default_factory=list)
    """Verification sets: names of .bin files in the data folder (e.g. 'lfw'), .bin paths, or paths of
    your own labelled faces (a folder of identity sub-folders, or one holding train.rec), evaluated on
    the pairs tools/eval_folder.py draws with its default count and seed."""
    image_size: int = 112
    """Height and width of the aligned face crops, in pixels."""
    num_workers: int = 2
    """Decoding threads (DALI) or worker processes (torch loader) per rank."""
    shuffle_buffer: int = 10000
    """DALI random_shuffle initial_fill: samples mixed before the first batch; large enough to mix
    identities of an identity-sorted .rec."""
    random_flip: bool = True
    """Random horizontal flip of training images."""
    on_bad_image: BadImagePolicy = "error"
    """An undecodable image: 'error' stops and names the record key, 'skip' drops it."""
    synthetic: SyntheticDataConfig | None = None
    """Generated face-like data set (the quickstart); null to read data.rec only."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation (random resized crop, low resolution, occlusion, color jitter, grayscale,
    blur, JPEG), all off by default; see AugmentConfig and docs/AUGMENTATION.md."""


@dataclass(kw_only=True)
class ModelConfig(_Section):
    section: ClassVar[str] = "model"
    network: Literal["r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large",
                     "vit_t", "vit_s", "vit_b", "vit_l"] = "r100"
    """Backbone: IResNet-18/34/50/100/200, MobileFaceNet ('mbf', 'mbf_large') or arcface_torch's ViT-T/S/B/L
    ('vit_t' .. 'vit_l', 9 x 9 patches: 112 px faces give 144 tokens; a smaller data.image_size gives
    (side // 9)^2). tests/test_models.py checks that these are the names largefr.models.get_model builds."""
    embedding_size: int = 512
    """Dimension of the face embedding."""
    dropout: float = 0.0
    """Dropout before the embedding layer (insightface's IResNet uses 0)."""
    activation_checkpointing: bool = False
    """Recompute each backbone block (IResNet block, MobileFaceNet block, ViT transformer block) in backward
    instead of keeping its activations: less memory for about one more forward of compute
    (tools/bench_backbone.py measures both). Same gradients; BatchNorm statistics move once per step.
    arcface_torch turns it on for its vit_b and vit_l."""
    drop_path_rate: float | None = None
    """ViT only: stochastic depth rate of the last block (linear from 0 in the first); null = the size's
    arcface_torch WebFace42M config value (0.05)."""
    mask_ratio: float | None = None
    """ViT only: fraction of patch tokens dropped in training (their places filled by a learned token after
    the blocks); null = the size's arcface_torch WebFace42M config value (vit_t/vit_s 0, vit_b/vit_l 0.05)."""
    init_from: str | None = None
    """Start the backbone from these weights: an insightface backbone.pth, a largefr model.pt
    (tools/export_backbone.py) or a largefr checkpoint (run folder, checkpoints/ or step_N; its backbone
    only, so the classifier may have another number of classes). Names and shapes must fit model.network
    and model.embedding_size exactly (an error names the keys; nothing is loaded in part). The momentum
    encoder starts as a copy of the loaded backbone. Ignored when the run resumes from a checkpoint."""


@dataclass(kw_only=True)
class HeadConfig(_Section):
    section: ClassVar[str] = "head"
    type: Literal[FixedMargin, AdaptiveMargin] = "arcface"
    """Margin form: 'arcface' cos(t + m), 'cosface' cos(t) - m, 'combined' cos(m1*t + m2) - m3; the adaptive
    ones (largefr/heads/margins/): 'curricularface' (Huang et al. 2020), 'magface' (Meng et al.
    2021), 'adaface' (Kim et al. 2022), 'elasticface' (Boutros et al. 2022), each with its head.* fields."""
    scale: float = 64.0
    """Logit scale s (64 in every one of the papers)."""
    margin: float = 0.5
    """Additive angular margin of arcface and curricularface (paper: 0.5), or additive cosine margin of
    cosface."""
    combined_margins: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.0])
    """[m1, m2, m3] of the combined margin, used when head.type is 'combined'."""
    easy_margin: bool = False
    """Where t + m > pi: keep cos(t) when cos(t) <= 0 (easy margin) instead of cos(t) - m*sin(m)."""
    curricular_momentum: float = 0.01
    """curricularface: momentum alpha of t <- alpha * mean target cosine + (1 - alpha) * t (paper: 0.01)."""
    magface_l_a: float = 10.0
    """magface: lower bound l_a of the feature magnitude (authors' run script: 10)."""
    magface_u_a: float = 110.0
    """magface: upper bound u_a of the feature magnitude (110)."""
    magface_l_margin: float = 0.45
    """magface: margin at magnitude l_a (0.45)."""
    magface_u_margin: float = 0.8
    """magface: margin at magnitude u_a (0.8)."""
    magface_lambda_g: float = 35.0
    """magface: weight lambda_g of the magnitude regulariser g(a) = a / u_a^2 + 1 / a (35)."""
    magface_easy_margin: bool = True
    """magface: margin only where cos(t) > 0 (the authors' MagLinear default); false: the th/mm fallback."""
    adaface_margin: float = 0.4
    """adaface: margin m (paper: 0.4)."""
    adaface_h: float = 0.333
    """adaface: h, how much of the normalised norm's spread reaches the margin (0.333)."""
    adaface_t_alpha: float = 0.01
    """adaface: momentum of the running mean and std of the feature norms (0.01)."""
    elastic_form: ElasticForm = "arc"
    """elasticface: 'arc' (ElasticFace-Arc, angular margin) or 'cos' (ElasticFace-Cos, cosine margin)."""
    elastic_margin: float | None = None
    """elasticface: mean m of the per-sample margin draw; null: the paper's 0.5 (arc) or 0.35 (cos)."""
    elastic_std: float | None = None
    """elasticface: std sigma of the draw; null: the paper's 0.05, with elastic_sorted 0.0175 (arc) / 0.02 (cos)."""
    elastic_sorted: bool = False
    """elasticface: ElasticFace+ (sorted margins assigned by the order of the target cosines)."""
    sample_rate: float = 1.0
    """Partial FC: fraction of each rank's classes used per step (positives kept); 1.0 = all."""
    logits_dtype: LogitsDtype = "fp32"
    """Dtype of the classifier logits matmul."""
    weight_dtype: WeightDtype = "fp32"
    """Storage dtype of the class-sized state: the classifier W, its optimizer's per-row state and the cluster
    bank's centers. 'bf16' halves their memory; the rows a step samples are gathered, upcast and computed in
    float32 (logits in head.logits_dtype), and the optimizer writes its rows back with stochastic rounding
    (docs/DESIGN.md, "Storage precision"). Fixed for a run: a resume must use the value it was written with."""
    chunk_size: int = 0
    """Classes (W rows) per block of the low-memory head (logits recomputed block by block); 0 = off."""
    init_std: float = 0.01
    """Standard deviation of the normal initialization of classifier rows."""
    init: HeadInit = "random"
    """Classifier start: 'random' (normal, head.init_std), or 'class_mean' (needs model.init_from): one pass
    of the loaded backbone over the training data sets each class's W row to its normalized mean embedding
    (weight imprinting, scaled to the norm of a random row) and its cluster-bank center and phi from the
    same pass, so the cluster terms are active from step 1. Skipped when the run resumes."""


@dataclass(kw_only=True)
class ClusterConfig(_Section):
    section: ClassVar[str] = "cluster"
    cg_margin: bool = True
    """Cluster-guided margin: scale each class's margin by lambda(phi) (Eqs. 3-5); false: 1."""
    lambda_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    """[lo, hi]: lambda = lo + (hi - lo) * normalized concentration."""
    contrastive_weight: float = 1.0
    """l1, weight of the term chosen by cluster.contrastive_type (L_con of Eq. 6 by default); 0 turns it off."""
    contrastive_type: ContrastiveType = "cluster"
    """What the contrastive_weight term is (logged as loss_con whatever the type).
    'cluster': L_con of Eq. 6, the paper's supervised cluster contrastive loss.
    'center': Center loss (Wen et al. 2016), the paper's Table 3 baseline: 1/(2N) sum_i ||f_i - C_{y_i}||^2,
    f_i the normalized embedding, C_{y_i} the cluster bank's normalized center of its class (detached),
    N the rows whose class has a center (every batch row in training: the bank is updated first; a row
    without one is ignored, as in L_con). The
    bank is already a momentum-updated set of class centers, playing the part of Wen et al.'s own
    moving-average centers, so no extra num_classes x d state and the only change against L_con is the
    loss form (pull to the own center, no negatives).
    'triplet': a triplet loss (Schroff et al. 2015, FaceNet), the other Table 3 baseline: anchor f_i,
    positive its class's center, negative the most similar center of another class among the same M
    sampled centers L_con uses (batch-hard mining, Hermans et al. 2017, the usual online variant of
    FaceNet's mining), mean_i max(0, ||f_i - C_{y_i}||^2 - ||f_i - C_n||^2 + triplet_margin). Same
    comparison objects as L_con, so only the loss form differs. Rows without a sampled positive or
    without any negative are ignored; centers are detached (the gradient reaches f_i only)."""
    triplet_margin: float = 0.2
    """FaceNet's alpha of contrastive_type 'triplet', on squared L2 distances of unit vectors (range [0, 4]);
    0.2 is FaceNet's value."""
    aligning_weight: float = 0.5
    """l2, weight of the cluster aligning loss L_ali (Eq. 7); 0 turns it off."""
    queue_size: int = 8192
    """Feature queue length (momentum-encoder features with labels, replicated on every rank)."""
    encoder_momentum: float = 0.999
    """EMA momentum of the momentum encoder."""
    bank_momentum: float = 0.9
    """Momentum of the cluster-center bank update (Eq. 1)."""
    num_sampled_centers: int = 2048
    """M: classes sampled over all ranks for L_con and L_ali (capped at data.num_classes)."""
    alpha: float = 10.0
    """Smoothing constant in phi's log(|Q_k| + alpha) (Eq. 1)."""
    temperature_mode: TemperatureMode = "pcl"
    """Temperature of L_con (used only by contrastive_type 'cluster'; the other types ignore it).
    'pcl': temperature = pcl_tau0 * phi / mean(phi), phi clipped to percentiles;
    'raw': the temperature is phi itself (the paper's form);
    'learnable': one learnable temperature tau0 shared by every class, the typical learnable temperature
    of InfoNCE that the paper's Table 4 compares phi against. Stored as log tau0 (positive, steps scale
    with tau0), replicated on every rank, stepped by the head's optimizer with the head's learning rate
    and no weight decay, like L_ali's tau; initial value contrastive_tau_init."""
    contrastive_tau_init: float = 0.1
    """Initial tau0 of temperature_mode 'learnable'; 0.1 = the mean temperature of the 'pcl' mode (pcl_tau0's
    default), so both modes start alike."""
    pcl_tau0: float = 0.1
    """Base temperature of the 'pcl' mode."""
    pcl_clip_percentiles: list[float] = field(default_factory=lambda: [10.0, 90.0])
    """[low, high] percentiles phi is clipped to in the 'pcl' mode."""
    align_tau_init: float = 0.07
    """Initial value of the learnable temperature of L_ali (stored as log tau)."""
    warmup_steps: int = 0
    """Ramp the cluster terms in over the first warmup_steps optimizer steps; 0 (the paper's way): full
    strength from step 1. With r = min(step / warmup_steps, 1), step counted from 0 at the first step,
    each class's margin scale is 1 + r * (lambda - 1) (ArcFace's margin at the start, the cluster-guided
    one from step warmup_steps on) and L_con and L_ali weigh r * contrastive_weight and
    r * aligning_weight. Why: at step 1 the queue is empty and the embedding untrained, so phi and the
    centers describe noise; the ramp lets the momentum encoder and the queue settle first. The queue
    and the bank are filled from step 1 whatever the ramp."""

    @property
    def enabled(self) -> bool:
        """True when any cluster term (CG margin, L_con, L_ali) needs the queue and the bank."""
        return self.cg_margin or self.contrastive_weight > 0 or self.aligning_weight > 0


@dataclass(kw_only=True)
class OptimConfig(_Section):
    section: ClassVar[str] = "optim"
    name: OptimizerName = "sgd"
    """Optimizer of the backbone and of the head."""
    lr: float = 0.1
    """Peak learning rate (after warmup) of the backbone."""
    momentum: float = 0.9
    """SGD momentum (sgd only)."""
    weight_decay: float = 5e-4
    """Weight decay (L2 for sgd/adam, decoupled for adamw)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam/AdamW betas."""
    head_lr: float | None = None
    """Learning rate of the classifier head; null = optim.lr."""
    head_grad_clip: float = 0.0
    """Gradient-norm clip of the head's parameters; 0 = off."""
    gradient_clipping: float = 0.0
    """Gradient-norm clip of the backbone, always set in DeepSpeed (its default is 1.0); 0 = off."""

    @property
    def effective_head_lr(self) -> float:
        return self.lr if self.head_lr is None else self.head_lr


@dataclass(kw_only=True)
class ScheduleConfig(_Section):
    section: ClassVar[str] = "schedule"
    type: ScheduleType = "poly"
    """'step': lr * gamma^(milestones passed); 'poly': lr * (1 - progress)^power after warmup."""
    unit: ScheduleUnit = "epoch"
    """Unit of schedule.warmup and schedule.milestones."""
    epochs: float = 20.0
    """Length of training in epochs (train.max_steps may end it earlier)."""
    warmup: float = 0.0
    """Linear warmup length from 0 to optim.lr, in schedule.unit."""
    milestones: list[float] = field(default_factory=list)
    """Step schedule: points (in schedule.unit) where the lr is multiplied by gamma; increasing."""
    gamma: float = 0.1
    """Step schedule decay factor."""
    power: float = 2.0
    """Poly schedule exponent (1.0 = linear decay)."""


@dataclass(kw_only=True)
class TrainConfig(_Section):
    section: ClassVar[str] = "train"
    batch_size: int = 128
    """Images per rank per micro-step."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (null = run schedule.epochs)."""
    seed: int = 2048
    """Seed of every random generator (offset by the rank where streams must differ)."""
    world: int | None = None
    """Ranks this config was written for: its global batch, steps per epoch and schedule assume them. A launch
    with another number of ranks still runs, and its banner says what changes (null = written for any)."""
    precision: Precision = "bf16"
    """Backbone precision; mapped by the trainer to DeepSpeed's bf16/fp16 sections."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: one of ZERO_STAGES (0, 1 or 2; ZeRO-3 is refused with the reason)."""
    on_nonfinite: NonFinitePolicy = "skip"
    """A non-finite loss: 'skip' the step, or 'abort' the run."""
    max_consecutive_nonfinite: int = 10
    """Abort after this many consecutive skipped non-finite steps."""
    collective_timeout_s: float | None = None
    """Timeout of every collective: a dead rank makes the others fail after it (null = $LARGEFR_DIST_TIMEOUT_S or 1800)."""
    hang_timeout_s: float = 300.0
    """Hang watchdog (largefr/train/watchdog.py): a rank whose process stops answering for this long, or that
    stays this long in one step's data or compute phase (or 10 x its median step time, when longer), ends
    every rank naming it; 0 turns it off. Keep it above the longest pause of a healthy process and below
    train.collective_timeout_s; see docs/RELIABILITY.md for scaling it to the step time."""
    debug_inject_nan_steps: list[int] = field(default_factory=list)
    """FAULT INJECTION (tests only): optimizer steps (1-based) whose loss is made NaN on rank debug_inject_nan_rank
    (through its embeddings, before the head's collectives, as a real fault would reach it)."""
    debug_inject_nan_rank: int = 0
    """FAULT INJECTION (tests only): the rank whose embeddings debug_inject_nan_steps poisons."""
    deterministic: bool = False
    """Deterministic torch kernels, so that two runs of one config give bit-identical weights (on the same
    machine, ranks and software): torch.use_deterministic_algorithms(True), cuDNN deterministic with its
    autotuning off, CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set (largefr/train/build.py set_determinism).
    Slower on GPUs; an op that has no deterministic kernel stops the run naming the op. The loaders are
    seeded from train.seed per (epoch, rank) whatever this flag says."""
    compile: bool = False
    """torch.compile the backbone (through DeepSpeed's engine.compile) and the momentum encoder's forward;
    compiled at the first step (minutes for deep networks). A compile failure warns once and the run goes
    on eagerly (largefr/train/compile.py). Measured gains: docs/PERFORMANCE.md."""
    compile_backend: str = "inductor"
    """torch.compile backend of train.compile ('inductor'; 'aot_eager' traces without generating code)."""
    channels_last: bool = False
    """Feed the backbone NHWC images (channels-last memory layout), which the fastest GPU convolution
    kernels use; no effect on what is computed."""
    overlap_reduction: bool = True
    """Reduce the backbone's gradients while backward runs: at ZeRO 0 (fp32, more than one rank) through
    torch DDP's reducer under the engine, at ZeRO 1 and 2 with DeepSpeed's overlap_comm and 25 MiB buckets
    (largefr.train.engine.OVERLAP_DEFAULTS; docs/DESIGN.md section 6). false: DeepSpeed's reduction after
    backward (one flat all-reduce at ZeRO 0). Same gradients either way; measured in docs/PERFORMANCE.md."""
    freeze_backbone_steps: int = 0
    """Backbone learning rate 0 for the first N optimizer steps (the head, warm-started or not, adapts
    first; BatchNorm statistics still move); the schedule is not shifted."""


@dataclass(kw_only=True)
class EvalConfig(_Section):
    section: ClassVar[str] = "eval"
    every: int = 0
    """Run verification every this many steps; 0 = only at the end."""
    batch_size: int = 64
    """Images per forward pass during verification."""
    nfolds: int = 10
    """Cross-validation folds of the verification accuracy (insightface protocol)."""
    flip: bool = True
    """Add the embedding of the horizontally flipped image."""


@dataclass(kw_only=True)
class CheckpointConfig(_Section):
    section: ClassVar[str] = "checkpoint"
    every: int = 0
    """Save every this many steps; 0 = only at the end."""
    keep_last: int = 3
    """Number of most recent checkpoints kept."""
    resume: str | None = None
    """null: start fresh; 'auto': latest complete checkpoint in checkpoint.dir if any; or a path."""
    dir: str | None = None
    """Checkpoint folder; null = <output>/checkpoints."""
    reset_optimizer: bool = False
    """On resume, load the weights and start every optimizer state afresh (backbone, head rows, temperatures):
    what a resume with another optim.name (or SGD momentum to or from 0) needs; without it such a resume is
    refused (largefr/checkpoint/resume_config.py lists the keys that may change on resume)."""


@dataclass(kw_only=True)
class LoggingConfig(_Section):
    section: ClassVar[str] = "logging"
    every: int = 50
    """Log metrics every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under <output>/tensorboard."""
    log_file: bool = True
    """Write <output>/train.log (rank 0)."""


@dataclass(kw_only=True)
class Config:
    data: DataConfig
    """Training and verification data."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """Margin-softmax classifier, partitioned across ranks by class."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Cluster-guided margin and cluster losses."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batching, precision and the training loop."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config keys, passed through; keys the trainer sets itself (DEEPSPEED_OWNED_KEYS) are
    refused."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Verification during training."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logs and TensorBoard."""
    output: str
    """Run folder: logs, TensorBoard, checkpoints, the resolved config."""

    def __post_init__(self) -> None:
        _raise_if_any(config_issues(self))

    @property
    def checkpoint_dir(self) -> Path:
        """checkpoint.dir, or <output>/checkpoints."""
        return Path(self.checkpoint.dir or Path(self.output) / "checkpoints")

    def global_batch_size(self, world_size: int) -> int:
        """Images per optimizer step over all ranks."""
        return self.train.batch_size * self.train.gradient_accumulation_steps * world_size

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>",
                  world_size: int | None = None) -> Config:
        """Build and check a config from plain data; raises ConfigError listing every problem."""
        return _build(data, source, {}, world_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that ``Config.from_dict`` turns back into an equal config."""
        return dataclasses.asdict(self)


def _build(data: Any, source: str, origins: dict[str, str], world_size: int | None,
           issues: list[Issue] | None = None) -> Config:
    issues = list(issues or [])
    config = build_section(Config, copy.deepcopy(data), "", issues, valid_keys(Config))
    if config is not None and world_size is not None:
        issues.extend(world_size_issues(config, world_size))
    if issues:
        raise ConfigError(issues, source, origins)
    return config


def config_to_json(config: Config) -> str:
    return json.dumps(config.to_dict(), indent=2) + "\n"


def config_classes() -> list[type]:
    """Every dataclass of the config tree (sections and nested sections)."""
    return [Config, DataConfig, SyntheticDataConfig, AugmentConfig, ModelConfig, HeadConfig, ClusterConfig,
            OptimConfig, ScheduleConfig, TrainConfig, EvalConfig, CheckpointConfig, LoggingConfig]


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written right after the field in the class body."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        is_doc = (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                  and isinstance(after.value.value, str))
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and is_doc:
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def load_config(path: str | Path, overrides: Sequence[str] = (),
                world_size: int | None = None) -> Config:
    """Read a JSON or YAML config, apply ``KEY=VALUE`` overrides and check everything at once."""
    path = Path(path)
    data = read_file(path)
    if not isinstance(data, dict):
        raise ConfigError([("<top level>", "a config file must hold a mapping of sections")],
                          str(path))
    origins: dict[str, str] = {}
    issues = apply_overrides(data, overrides, origins)
    return _build(data, str(path), origins, world_size, issues)
