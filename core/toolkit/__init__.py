"""The methods' toolkit, for attack and defense plugins: batch-norm neurons and their masks
(``channels``), adversarial perturbations and trigger inversion (``adversarial``), the frequency
domain (``frequency``), warping fields (``warping``), implicit hypergradients (``implicit``) and the
learnt-trigger networks (``iad_networks``, ``stegastamp``). Built on the training core; beside the
engine, which it never imports (nor the engine it). This ``__init__`` imports nothing."""
