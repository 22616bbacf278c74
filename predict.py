"""Segment your own images from K labelled examples with a trained few-shot model.

    python predict.py --run exp/demo/ablation/split0/svf/seed321 --support cat.jpg cat.png --query photos/ --out seg/
    python predict.py --config CFG --weights W --support IMG MASK [--support IMG MASK ...] \\
        --query FILE|FOLDER|GLOB ... --out DIR [--class-id N] [--batch-size B] [key=value ...]

Writes OUT/masks/NAME.png (the query's size; 0 background, 255 object), OUT/figures/NAME.png (supports with
their mask | query with the prediction, as test.py --vis) and OUT/summary.csv (query, status, foreground fraction,
seconds; files of a folder that are not images are skipped with a warning and listed as skipped).

In Python (a notebook):

    from predict import Predictor
    p = Predictor.from_run("exp/demo/ablation/split0/svf/seed321")      # or Predictor(config, weights)
    result = p.predict("query.jpg", supports=[("cat.jpg", "cat.png")])  # paths, numpy arrays or PIL images
    result.mask, result.prob                                            # (H, W) uint8 0/1, float32 P(object)

The code is engine/predict.py; docs/predict.md has the formats and the rules.
"""
from engine.predict import BadInput, Prediction, Predictor, main, read_mask, run  # noqa: F401

__all__ = ["Predictor", "Prediction", "BadInput", "read_mask", "main"]

if __name__ == "__main__":
    run()
