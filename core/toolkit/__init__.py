"""The methods' toolkit, for attack, defense and detector plugins: batch-norm neurons and their masks
(``channels``), adversarial perturbations and trigger inversion (``adversarial``), the frequency
domain (``frequency``), warping fields (``warping``), implicit hypergradients (``implicit``), the
learnt-trigger networks (``iad_networks``, ``stegastamp``); for detectors, a model read in batches
(``features``: logits, penultimate features, a layer's output), clustering (``clusters``), robust
statistics (``robust``), superimposition and pixel scaling (``perturb``) and the common image
corruptions (``corruptions``); for training-time defenses, each row's loss and a set split by a
decision or a rank (``samples``). Built on the training core; beside the engine, which it never
imports (nor the engine it). This ``__init__`` imports nothing."""
