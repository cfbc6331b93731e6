"""Score an encoder on the seven STS tasks (cosine, Spearman x100) and write a JSON file.

python launchers/evaluate.py all-MiniLM-L6-v2
python launchers/evaluate.py runs/demo/final --out runs/demo/eval.json
python launchers/evaluate.py all-MiniLM-L6-v2 --keep-layers 0 2 5 --label minilm-L3
"""

from disco_dist.cli.commands import main

if __name__ == "__main__":
    main("evaluate", description=__doc__)
