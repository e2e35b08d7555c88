"""``rated-sentiment``: 23,703 sentences from tweets, movie reviews, Amazon reviews and New York Times editorials,
each with the mean of at least 20 human ratings on -4..+4 (Hutto and Gilbert, ICWSM 2014: the ground truth of the
VADER paper). They come in ``additional_resources/hutto_ICWSM_2014.tar.gz`` of the ``vaderSentiment==3.3.2``
source archive (the wheel lacks them); MIT, and the authors ask for a citation of the paper.

Three classes by the mean rating: negative below -0.5, positive above +0.5, neutral between (the raters' scale
puts 0 at "neutral"; half a point either way keeps the sentences the raters leaned on). Split 80/10/10 with the
fixed split seed, a repeated sentence kept in one split.
"""

from __future__ import annotations

from . import Example, Task, deterministic_split
from .sources import Source, fetch, read_inner_tar

RATED_SENTIMENT = "rated-sentiment"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
VADER = Source(
    requirement="vaderSentiment==3.3.2", filename="vaderSentiment-3.3.2.tar.gz",
    sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", size_bytes=2_466_783,
    licence="MIT; its authors ask for a citation of Hutto and Gilbert, ICWSM 2014", members=(INNER_ARCHIVE,),
)
LABELS = ["negative", "neutral", "positive"]
NEUTRAL_BAND = 0.5  # |mean rating| at most this is neutral


def label_of(mean_rating: float) -> int:
    return 0 if mean_rating < -NEUTRAL_BAND else 2 if mean_rating > NEUTRAL_BAND else 1


def read_ratings() -> list[tuple[str, float, str]]:
    """``(sentence, mean rating, domain)`` of every line of the four ``*_GroundTruth.txt`` files (TSV: id, mean,
    text), in file order."""
    files = read_inner_tar(fetch(VADER) / INNER_ARCHIVE, "_GroundTruth.txt")
    rows = []
    for name in sorted(files):
        domain = name.rsplit("/", 1)[-1].removesuffix("_GroundTruth.txt")
        for line in files[name].decode("utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[2].strip():
                rows.append((parts[2].strip(), float(parts[1]), domain))
    return rows


def load_rated_sentiment() -> Task:
    rows = read_ratings()
    examples = [Example(text, label=label_of(rating)) for text, rating, _ in rows]
    splits = deterministic_split(examples, groups=[text for text, _, _ in rows], shuffled=True)
    return Task(RATED_SENTIMENT, "classification", *splits, label_names=LABELS)
