"""The demo kit, which the core never imports: the embedded offline models (:mod:`.models`), the bundled WordNet
data (:mod:`.wordnet`), perplexity / accuracy helpers (:mod:`.evaluation`) and plots (:mod:`.plotting`).

Calibration batches are core (:func:`hf_lowrank.calibration_batches`), not part of the kit.
"""
