"""zsad: zero-shot visual anomaly detection (random-word CLIP prompts + FNN, WinCLIP-style heatmaps).

Data flow, one module per step:
    preprocess.py   image bytes -> RGB -> model pixels (+ geometry to map heat back)
    clip_backend.py open_clip model, weights, device, precision; text_encoding.py (fast text path)
    windows.py      global + window embeddings (ViT token selection, CNN attention-pool windows)
    prompts.py      vocabulary, random-word pairs, prompt ensembles
    fnn.py          the 4-layer FNN and its trainer
    scoring.py      s_fnn, s_pr, combined
    aggregate.py    window scores -> patch maps (harmonic means) -> full-resolution heatmap
    heatmap.py      overlay PNG, binary mask, connected regions
    detector.py     the pipeline above as one object, loaded from the model store (store.py)
    api/            the REST service; cli.py the `zsad` command
"""
__version__ = "0.1.0"
