"""Building blocks of the ``sample_from_probs`` op: the race's noise (noise.py) and the candidate
search that lets a filtered row race over a few tokens instead of the vocabulary (candidates.py)."""
