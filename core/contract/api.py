"""The types a plugin works with. Importing this module does not import torch (keeps `bench --help` fast)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from . import config as _config
from .sources import Deviation, Source

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class Split:
    """A split of a dataset: uint8 images (N, C, H, W) and int64 labels (N,), on one device."""

    images: "torch.Tensor"
    labels: "torch.Tensor"

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, index) -> "Split":
        return Split(self.images[index], self.labels[index])


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset plugin. ``load(root)`` returns (train, test) on the CPU; ``root`` is a local folder
    holding the data (``None``: the plugin's default, e.g. a download into the cache)."""

    name: str
    load: Callable[[Any], tuple[Split, Split]]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int = 32
    description: str = ""
    # The class names, by label (the data's class folder names, which it sorts into labels), where
    # they are names: `bench defend` labels a user's named class folders by them. () when none.
    classes: tuple[str, ...] = ()
    provider: str = ""     # "distribution version", filled in by the registry
    source_hash: str = ""  # sha256 of the plugin's module source, filled in by the registry


@dataclass(frozen=True)
class ModelSpec:
    """A model plugin: ``build(num_classes) -> nn.Module`` and the dotted names of its declared layers:

    - ``attention_layers``: the modules whose outputs are the attention features (NAD);
    - ``classifier_layer``: the final linear layer. Its inputs are the model's last features, after
      the final normalisation and nonlinearity, globally pooled: one input per channel of the last
      feature map (for a WRN, the channels after the last BN-ReLU, not the ``block3`` output). These
      are the channels fine-pruning ranks and prunes.

    A built module may override either with an attribute of the same name (e.g. when they depend
    on the timm model chosen)."""

    name: str
    build: Callable[[int], "nn.Module"]
    attention_layers: tuple[str, ...] = ()
    classifier_layer: str = ""
    description: str = ""
    provider: str = ""
    source_hash: str = ""


class _Configurable:
    """Shared part of attacks and defenses: a name, a typed ``Config`` and an instance config."""

    name: ClassVar[str]
    Config: ClassVar[type]
    description: ClassVar[str] = ""
    provider: ClassVar[str] = ""     # "distribution version", set by the registry
    source_hash: ClassVar[str] = ""  # sha256 of the plugin's code (its module and imports), set by the registry
    # The config fields a grid's profile sets (the engine applies them; ``--set`` wins): field ->
    # the name of a ``Profile`` field whose value it takes when that is not None (e.g.
    # ``{"lr": "finetune_lr"}``), or {profile name: value} (e.g. ``{"rounds": {"quick": 2}}``).
    # Nothing else of a profile reaches a plugin's config.
    profile_settings: ClassVar[dict[str, Any]] = {}
    # Where the method comes from (paper, official repository, file and commit read) and each
    # deviation from it (``nadbench.sources``): `bench list NAME` shows them, each cell logs them,
    # docs/fidelity.md is generated from them. Built-ins must declare them; third parties may.
    sources: ClassVar[tuple[Source, ...]] = ()
    deviations: ClassVar[tuple[Deviation, ...]] = ()
    # Named variants, spelled ``NAME@variant`` (combined: ``NAME@bb@all2all``, in any order), each its
    # own grid cell and table row, and the Config values each starts from, under the profile's and the
    # user's (``--set``): e.g. ``{"bb": {"delta": 40.0}}`` for BackdoorBench's settings, or
    # ``{"all2all": {"poison_rate": 0.4}}`` where the all-to-all variant (offered by every attack with
    # a ``target_mode`` field, which it sets) needs more poisoning to implant. A value may be
    # ``{profile name: value}`` (used on that profile only).
    variant_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
        _config.validate(self.config, prefix=f"{self.name}.")

    @classmethod
    def from_overrides(cls, overrides: dict[str, str] | None = None):
        return cls(_config.build(cls.Config, overrides, prefix=f"{cls.name}."))


@dataclass
class AttackContext:
    """What an attack may use while preparing its trigger (in :meth:`Attack.prepare`)."""

    dataset: DatasetSpec
    train: Split            # the clean training set, uint8 on ``device``
    device: Any
    seed: int
    # A clean model of the grid's student architecture (float [0, 1] input, eval mode, on
    # ``device``), trained once by the engine with the profile's schedule and cached.
    clean_model: Callable[[], "nn.Module"] | None = None
    # (train, test) of another registered dataset, on the CPU: e.g. Refool's reflection pool.
    load_dataset: Callable[[str], tuple[Split, Split]] | None = None
    # Log a matplotlib figure or a uint8 (C, H, W) image as the artifact ``attack/<path>`` of every
    # cell that uses this attack (e.g. "trigger.png").
    log_image: Callable[[str, Any], None] = lambda path, image: None
    progress: bool = True


TARGET_MODES = ("all2one", "all2all")


class Attack(_Configurable):
    """An attack plugin. ``Config`` must have a ``target`` field (the target label) and, unless the
    attack overrides :meth:`poison_train`, a ``poison_rate`` field. A ``target_mode`` field
    (``"all2one"`` or ``"all2all"``, see :data:`TARGET_MODES`) makes the attack all-to-all
    capable: each image's target is then ``(y + 1) mod C``, as in the official WaNet, IAD and
    BppAttack code; the grid spells that variant ``NAME@all2all``.

    Subclasses implement :meth:`apply_trigger`; dirty-label poisoning and the test-time trigger come
    from this base class, with per-image targets (:meth:`targets`). Clean-label attacks set
    ``clean_label = True``: then only target-class images are poisoned and labels stay as they were.

    An attack that controls the training of the backdoored model returns a fresh
    :class:`nadbench.training.train.Step` from :meth:`train_step` (e.g. WaNet's noise samples, BppAttack's
    negatives, added per batch); the engine trains every model it backdoors with it. One whose
    trigger is learnt in that training sets ``learns_trigger`` and implements :meth:`learned_state`
    and :meth:`load_learned_state`. One that needs a longer schedule than the profile's to implant
    gives its Config an ``epochs`` field (None: the profile's); the engine then trains every model it
    backdoors for that many epochs (a step schedule's milestones at the same fractions), e.g. set per
    profile for one variant: ``variant_defaults = {"all2all": {"epochs": {"quick": 20}}}``.
    """

    clean_label: ClassVar[bool] = False
    # True when ``prepare`` crafts against ``ctx.clean_model()`` (Trojan, CL): the poisoning then
    # depends on that model, so the engine keys the stored poisoning by it (and offers it only then).
    uses_clean_model: ClassVar[bool] = False
    # The dataset's number of classes, set by the core before the attack is used.
    num_classes: int | None = None
    # True when the trigger is learnt while the model trains (a generator, a pattern optimised with
    # the classifier): the engine then stores :meth:`learned_state` with each model it backdoors
    # (a teacher of another architecture is trained by a copy of the attack, with its own state) and
    # makes the ASR set after the student's training, with what it learnt.
    learns_trigger: ClassVar[bool] = False
    # The datasets ``--attacks all`` runs the attack on (empty: every dataset of the grid): where it
    # implants on the quick profile. Naming the attack runs it on any dataset.
    all_datasets: ClassVar[tuple[str, ...]] = ()

    def prepare(self, ctx: AttackContext) -> None:
        """Craft whatever the trigger needs (a generated pattern, a key); called once before use."""

    def apply_trigger(self, images: "torch.Tensor") -> "torch.Tensor":
        """Put the trigger on a uint8 batch (N, C, H, W); return a new uint8 tensor."""
        raise NotImplementedError

    def poison_images(self, images: "torch.Tensor", labels: "torch.Tensor") -> "torch.Tensor":
        """Transform the chosen training images; by default the test-time trigger."""
        return self.apply_trigger(images)

    @property
    def controls_training(self) -> bool:
        """Whether the attacker runs the training of the backdoored model (its own :meth:`train_step`,
        or a trigger learnt while the model trains): its poisoning is then no stored set of rows that
        a data detector could inspect. An attack whose step depends on its config overrides this."""
        return self.learns_trigger or type(self).train_step is not Attack.train_step

    @property
    def all_to_all(self) -> bool:
        return getattr(self.config, "target_mode", "all2one") == "all2all"

    def check(self, dataset: DatasetSpec) -> None:
        """Validate the config against a dataset before anything trains (the counterpart of
        :meth:`Defense.check`): raise ``ConfigError`` for one it cannot hold, e.g. a source class the
        dataset lacks. The default accepts everything (the engine checks ``target`` itself)."""

    def targets(self, labels: "torch.Tensor") -> "torch.Tensor":
        """Each image's target label: the config's ``target`` (all-to-one) or ``(y + 1) mod C``. A
        target equal to the image's own label leaves it out of ASR and, in :meth:`poison_train`,
        keeps its label: a source-specific attack returns the label itself for the other classes."""
        import torch

        if self.all_to_all:
            if not self.num_classes:
                raise RuntimeError(f"attack {self.name!r}: all-to-all targets need num_classes (set by the core)")
            return (labels + 1) % self.num_classes
        return torch.full_like(labels, self.config.target)

    def evaluations(self, labels: "torch.Tensor") -> dict[str, "torch.Tensor"]:
        """Extra evaluations of the trigger, by name (an identifier): each test image's target, as
        :meth:`targets` gives them for ASR (a target equal to the image's own label leaves it out).
        The engine triggers those images and measures the share the model classifies as their
        target, as it measures ASR, logged as ``before.attack.<name>`` / ``after.attack.<name>``; the
        attack never sees a prediction. E.g. a source-specific attack's cover side: the other classes
        sent to the target."""
        return {}

    def train_step(self, poisoned: "torch.Tensor", n_train: int) -> "Any":
        """A fresh ``nadbench.training.train.Step`` for each model the engine backdoors on this attack's
        poisoned training set (``n_train`` images, of which ``poisoned`` are the indices
        :meth:`poison_train` chose), or None (the default: plain training on the poisoned set).
        ``poisoned`` lives on the device of the data and the model; it carries no seed: draw
        randomness in ``Step.batch`` from its ``generator``, the loop's, seeded by the run."""
        return None

    def learned_state(self) -> dict[str, "torch.Tensor"]:
        """What the attack learnt while its step trained a model (``learns_trigger``): tensors that
        are stored with that model, so that a cache hit, a worker or `bench attack` triggers alike.
        The engine also calls it after the first optimiser step, to refuse anything else early."""
        return {}

    def load_learned_state(self, state: dict[str, "torch.Tensor"]) -> None:
        """Put back what :meth:`learned_state` returned, for a model loaded from the store."""

    def poison_train(self, train: Split, generator: "torch.Generator") -> tuple[Split, "torch.Tensor"]:
        """Return the poisoned training set and the indices of the poisoned images."""
        import torch

        if self.clean_label:
            candidates = (train.labels.cpu() == self.config.target).nonzero().flatten()
        else:
            candidates = torch.arange(len(train))
        count = int(round(self.config.poison_rate * len(candidates)))
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        chosen = chosen.sort().values.to(train.images.device)
        images, labels = train.images.clone(), train.labels.clone()
        images[chosen] = self.poison_images(images[chosen], labels[chosen])
        if not self.clean_label:
            labels[chosen] = self.targets(labels[chosen])
        return Split(images, labels), chosen

    def trigger_test(self, test: Split) -> Split:
        """The ASR set: triggered test images whose target differs from their true label (labels
        kept; :meth:`targets` gives each one's target)."""
        keep = self.targets(test.labels) != test.labels
        return Split(self.apply_trigger(test.images[keep]), test.labels[keep])


@dataclass
class DefenseContext:
    """What a defense may use: the model architectures, the device, the seed and the logging
    callbacks. It holds nothing that loads data (no test split, no triggered images) and never says
    which attack was used: the defense works from the model and the clean subset alone."""

    device: Any
    num_classes: int
    student: str                          # the architecture of the model to repair
    teacher: str                          # the teacher architecture (defenses with uses_teacher)
    seed: int
    student_layers: tuple[str, ...] = ()  # attention layers of each (dotted module names)
    teacher_layers: tuple[str, ...] = ()
    # The student's final linear layer (dotted name; see ModelSpec.classifier_layer), "" when its
    # model declares none.
    classifier_layer: str = ""
    # A fresh, randomly initialised model of a registered architecture (float [0, 1] input, on device).
    build_model: Callable[[str], "nn.Module"] = None  # type: ignore[assignment]
    # The model of a given architecture as the supplier handed it over (a fresh copy each call), or
    # None when there is none: in a grid, the backdoored model of that architecture, trained by the
    # engine on the same poisoned data (teacher source "supplied"; None under "scratch"); in
    # `bench defend`, the user's model for its own architecture, or the --teacher file.
    supplied_model: Callable[[str], "nn.Module | None"] = lambda arch: None
    log_metric: Callable[[str, float, int | None], None] = lambda key, value, step=None: None
    # Log a matplotlib figure as the artifact ``defense/<path>`` of the run (e.g. "pruning.png").
    log_figure: Callable[[Any, str], None] = lambda figure, path: None
    progress: bool = True


@dataclass
class Defended:
    """What ``Defense.defend`` may return instead of the bare repaired model: the repaired model and
    extra models along one axis (e.g. MCR's points along its curve, keyed by t), which the engine
    evaluates like the repaired one (ACC and, where it holds triggered data, ASR) and logs as a curve
    over ``axis``: the picture of a method whose evaluation needs data the defense never sees.

    ``models``: named side models the engine evaluates the same way and logs as ``<name>.acc`` /
    ``<name>.asr`` (NAD: its finetuned teacher, against which the student's outcome is read)."""

    model: "nn.Module"
    extras: dict[float, "nn.Module"] = field(default_factory=dict)
    axis: str = "t"
    models: dict[str, "nn.Module"] = field(default_factory=dict)


class Defense(_Configurable):
    """A defense plugin: ``defend(model, clean, ctx)`` returns the repaired model (an ``nn.Module``),
    or a :class:`Defended` holding it and extra models for the engine to evaluate.

    ``uses_teacher = True`` makes the grid's ``--teachers`` (and ``--teacher-sources``) axes
    multiply this defense's cells; the teacher architecture is then ``ctx.teacher``.

    ``check(student_layers, teacher_layers)`` runs before anything trains, with the attention-layer
    names of each student/teacher pair of the grid: raise ``ConfigError`` for a config that cannot
    work with them (NAD: one beta per attention layer), so the user learns it in seconds.
    """

    uses_teacher: ClassVar[bool] = False
    # True when ``defend`` needs ``ctx.classifier_layer`` (fine-pruning): a grid whose student
    # architecture declares none is then refused before anything trains.
    uses_classifier: ClassVar[bool] = False
    # False for a data-free defense (CLP): the core then hands ``defend`` an empty clean split (it
    # reads no data, by construction), and `bench defend` runs it without ``--clean``.
    uses_clean_data: ClassVar[bool] = True
    # True for a training-time defense (:class:`TrainingDefense`): it trains the model itself.
    trains: ClassVar[bool] = False

    def check(self, student_layers: tuple[str, ...], teacher_layers: tuple[str, ...]) -> None:
        """Validate the config against the architectures; the default accepts everything."""

    def defend(self, model: "nn.Module", clean: Split, ctx: DefenseContext) -> "nn.Module | Defended":
        raise NotImplementedError


@dataclass
class TrainingContext:
    """What a training-time defense may use: the architecture it trains, the profile's schedule,
    models and detectors, device, seed, logging. Never which rows are poisoned, nor the attack."""

    device: Any
    num_classes: int
    arch: str                             # the architecture to train
    seed: int
    schedule: Any = None                  # the profile's training schedule (nadbench.training.train.Optim)
    layers: tuple[str, ...] = ()          # the architecture's attention layers (dotted module names)
    classifier_layer: str = ""
    # A fresh model of ``arch`` (float [0, 1] input, on device), initialised from the seed as plain training's is.
    build_model: Callable[[], "nn.Module"] = None  # type: ignore[assignment]
    # The model plain training on the same set gives (the profile's schedule): what a defender who
    # trains first and inspects after holds. A grid reuses its stored backdoored model; a fresh copy per call.
    plain_model: Callable[[], "nn.Module"] = None  # type: ignore[assignment]
    # ``detect(name)``: a registered data detector the defense names in ``uses_detectors``, run by the
    # engine over the training set (the clean share mixed in, as in a detection cell): a score per
    # row and a decision (the detector's own, else the threshold at the run's FPR on the clean share).
    detect: Callable[[str], "Detection"] = None  # type: ignore[assignment]
    log_metric: Callable[[str, float, int | None], None] = lambda key, value, step=None: None
    log_figure: Callable[[Any, str], None] = lambda figure, path: None
    progress: bool = True


class TrainingDefense(Defense):
    """A training-time defense: the defender trains the model on a set someone else supplied, part of it
    poisoned, unknown which. ``train(data, clean, ctx)`` returns the model it trained (or a
    :class:`Defended`), through the core loop (``nadbench.training.train.train`` with a ``Step``).

    It is a :class:`Defense` so that it is picked, configured, reported and ranked as every defense is
    (ACC, ASR, RA, DER against the plainly trained model of the same poisoning and seed); the engine
    refuses it on attacks that control training (``Attack.controls_training``), whose threat model has
    the attacker run the training this defender runs. ``uses_clean_data`` (default False) gives it the
    cell's clean share; ``uses_detectors`` names the data detectors it runs through ``ctx.detect``
    (their configs and code are in its stored model's key)."""

    trains: ClassVar[bool] = True
    uses_clean_data: ClassVar[bool] = False

    @property
    def uses_detectors(self) -> tuple[str, ...]:
        return ()

    def train(self, data: Split, clean: Split, ctx: TrainingContext) -> "nn.Module | Defended":
        raise NotImplementedError

    def defend(self, model, clean, ctx):
        raise TypeError(f"{self.name} is a training-time defense: it trains a model on the supplied set "
                        "(train(data, clean, ctx)) and repairs none; use `bench train`, or a grid cell")


DETECTOR_LEVELS = ("data", "input")


@dataclass
class DetectionContext:
    """What a detector may use besides its data: the model's architecture and layers, the device,
    the seed and the logging callbacks. Like :class:`DefenseContext` it holds nothing that loads data
    and never says which attack was used, which rows are poisoned or which inputs are triggered."""

    device: Any
    num_classes: int
    seed: int
    arch: str = ""                        # the architecture of the model ("" when there is none)
    # The model's attention layers and its final linear layer (dotted names; see ModelSpec): the
    # inputs of ``classifier_layer`` are the penultimate features most detectors read.
    layers: tuple[str, ...] = ()
    classifier_layer: str = ""
    # A fresh, randomly initialised model of a registered architecture (float [0, 1] input, on device).
    build_model: Callable[[str], "nn.Module"] = None  # type: ignore[assignment]
    log_metric: Callable[[str, float, int | None], None] = lambda key, value, step=None: None
    # Log a matplotlib figure as the artifact ``detector/<path>`` of the run.
    log_figure: Callable[[Any, str], None] = lambda figure, path: None
    progress: bool = True


@dataclass
class Detection:
    """What a detector may return instead of bare scores: one suspicion score per row or input
    (higher: more suspicious) and, optionally, its own decision (a bool per row or input, True where
    it flags one). Without a decision the engine thresholds the scores at the grid's false-positive
    rate on the defender's clean share."""

    scores: "torch.Tensor"
    flagged: "torch.Tensor | None" = None


class Detector(_Configurable):
    """A detector plugin, at one of two ``level``\\ s (:data:`DETECTOR_LEVELS`):

    - ``"data"``: inspects a training set someone supplied. :meth:`detect` gets the set (uint8 images
      and labels, never which rows are poisoned), the defender's clean share and, when the class sets
      ``uses_model``, the model the engine trained on that set (None otherwise); it returns a score per
      row (a tensor, or a :class:`Detection` with its own decision).
    - ``"input"``: screens the inputs of a deployed model. :meth:`prepare` gets the model and the
      clean share once; :meth:`score` then gets batches of uint8 inputs (clean and triggered shuffled
      together; it never learns which are which) and returns a score per input. A score must not
      depend on the other inputs of its batch: permuting a batch permutes its scores.

    Scores are checked (one finite value per row or input); a detector that only scores is given the
    engine's decision (the threshold at the grid's false-positive rate on the clean share)."""

    level: ClassVar[str] = "data"
    # Data level: whether :meth:`detect` needs the model trained on the inspected set (the engine
    # trains it, or `bench detect` takes it with --model). Input detectors always get the model.
    uses_model: ClassVar[bool] = True

    def detect(self, data: Split, clean: Split, model: "nn.Module | None",
               ctx: DetectionContext) -> "torch.Tensor | Detection":
        """Data level: a suspicion score per row of ``data``."""
        raise NotImplementedError

    def prepare(self, model: "nn.Module", clean: Split, ctx: DetectionContext) -> None:
        """Input level: whatever the scores need from the clean share (statistics, overlays, a
        threshold); called once before :meth:`score`."""

    def score(self, model: "nn.Module", images: "torch.Tensor") -> "torch.Tensor | Detection":
        """Input level: a suspicion score per input of a uint8 batch (N, C, H, W) on the device."""
        raise NotImplementedError
