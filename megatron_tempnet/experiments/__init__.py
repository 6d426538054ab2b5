"""Applications built on the library: the learning-quality study (``study/``, CLI
``tools/study.py``) and the layout estimator (``estimate.py``, CLI ``tools/estimate.py``)."""
