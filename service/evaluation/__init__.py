"""Offline evaluation: dataset readers, metrics (streaming pixel metrics incl. PRO), report writer, batch runner.

    readers.py  MVTec-AD / VisA / folder / multi-label CSV -> list of Sample
    metrics.py  image AUROC / AUPR / F1-max, PixelMetricAccumulator (pixel AUROC / AUPR / F1-max / PRO), thresholds
    report.py   metrics.json, thresholds.json, scores.csv, report.md, ROC / PR PNGs
    run.py      evaluate(samples, score_fn, out_dir, variants): stream, accumulate, report
"""
