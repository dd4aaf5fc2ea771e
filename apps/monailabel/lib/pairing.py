"""Which datastore images form a registration pair, per bundle: subject, default moving image, training pairs.

Pure Python (no MONAI Label import), so the rules are tested with the project's own test environment.

- ``segreg_acdc`` (intra-subject cine MR): ids ``patientNNN_frameMM``; the moving image of a frame is the other
  frame of the same patient; training uses both directions between the frames of each patient.
- ``segreg_thorax`` (FBCT -> CBCT, Learn2Reg naming ``<name>_<case>_<phase>``): phase ``0000`` is the planning CT
  (moving); any other phase of the same case is a fixed CBCT.
- ``segreg_abdomen`` (inter-subject CT): every image is its own subject (any id: give this bundle a datastore of its
  own); the moving image must be named in the request, training pairs each subject with the next one (both
  directions).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable


class PairingError(ValueError):
    """No registration pair can be formed; the message says which id and what to pass instead."""


class PairingRule:
    """Base rule: ``subject`` of an image id, ``default_moving`` for a fixed id, ``training_pairs`` of labelled ids."""

    intra_subject = True
    PATTERN: re.Pattern | None = None  # image ids this rule pairs (None: any)

    def matches(self, image_id: str) -> bool:
        return self.PATTERN is None or self.PATTERN.match(image_id) is not None

    def subject(self, image_id: str) -> str:
        return image_id

    def default_moving(self, fixed_id: str, image_ids: Iterable[str]) -> str:
        raise PairingError(f"no default moving image for {fixed_id}; pass params.moving_image (a datastore image id)")

    def training_pairs(self, image_ids: Iterable[str]) -> list[tuple[str, str]]:
        """``(fixed, moving)`` pairs among ``image_ids`` (labelled images; ids of other data sets are skipped)."""
        by_subject: dict[str, list[str]] = {}
        for i in sorted(i for i in set(image_ids) if self.matches(i)):
            by_subject.setdefault(self.subject(i), []).append(i)
        return [(f, m) for ids in by_subject.values() for f in ids for m in ids if f != m]


class ACDCPairing(PairingRule):
    PATTERN = re.compile(r"^(?P<subject>patient\d+)_frame(?P<frame>\d+)$")

    def _match(self, image_id: str) -> re.Match:
        m = self.PATTERN.match(image_id)
        if m is None:
            raise PairingError(
                f"{image_id} is not named like an ACDC frame (patientNNN_frameMM); pass params.moving_image"
            )
        return m

    def subject(self, image_id: str) -> str:
        return self._match(image_id)["subject"]

    def default_moving(self, fixed_id: str, image_ids: Iterable[str]) -> str:
        subject = self.subject(fixed_id)
        others = sorted(i for i in image_ids if i != fixed_id and self.matches(i) and self.subject(i) == subject)
        if not others:
            raise PairingError(f"{fixed_id}: no other frame of {subject} in the datastore; pass params.moving_image")
        return others[0]


class ThoraxPairing(PairingRule):
    PATTERN = re.compile(r"^(?P<subject>.+_\d{4})_(?P<phase>\d{4})$")
    PLANNING = "0000"

    def _match(self, image_id: str) -> re.Match:
        m = self.PATTERN.match(image_id)
        if m is None:
            raise PairingError(f"{image_id} is not named <name>_<case>_<phase> (Learn2Reg); pass params.moving_image")
        return m

    def subject(self, image_id: str) -> str:
        return self._match(image_id)["subject"]

    def default_moving(self, fixed_id: str, image_ids: Iterable[str]) -> str:
        m = self._match(fixed_id)
        if m["phase"] == self.PLANNING:
            raise PairingError(f"{fixed_id} is the planning CT; pick a CBCT as the image or pass params.moving_image")
        planning = f"{m['subject']}_{self.PLANNING}"
        if planning not in set(image_ids):
            raise PairingError(f"{fixed_id}: planning CT {planning} is not in the datastore; pass params.moving_image")
        return planning

    def training_pairs(self, image_ids: Iterable[str]) -> list[tuple[str, str]]:
        ids = {i for i in image_ids if self.matches(i)}
        return [
            (i, f"{self.subject(i)}_{self.PLANNING}")
            for i in sorted(ids)
            if self._match(i)["phase"] != self.PLANNING and f"{self.subject(i)}_{self.PLANNING}" in ids
        ]


class InterSubjectPairing(PairingRule):
    intra_subject = False

    def training_pairs(self, image_ids: Iterable[str]) -> list[tuple[str, str]]:
        ids = sorted(i for i in set(image_ids) if self.matches(i))
        if len(ids) < 2:
            return []
        ring = [(ids[k], ids[(k + 1) % len(ids)]) for k in range(len(ids))]
        return sorted({p for a, b in ring for p in ((a, b), (b, a))})


RULES = {"segreg_acdc": ACDCPairing, "segreg_thorax": ThoraxPairing, "segreg_abdomen": InterSubjectPairing}


def pairing_rule(bundle: str) -> PairingRule:
    return RULES.get(bundle, InterSubjectPairing)()


def split_by_subject(
    image_ids: Iterable[str], rule: PairingRule, val_fraction: float = 0.2
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Training and validation ``(fixed, moving)`` pairs of the labelled ``image_ids``, no subject on both sides.

    Subjects are split first (the last ones in sorted order validate), then paired within each side. Inter-subject
    bundles need two subjects per side. With too few subjects, validation reuses the training pairs (the train
    task reports it).
    """
    pairs = rule.training_pairs(image_ids)
    if not pairs:
        raise PairingError("no labelled image pairs in the datastore: save label maps (tag 'final') for both images")
    ids = sorted({i for p in pairs for i in p})  # images that belong to a pair (a lone labelled frame does not)
    subjects = sorted({rule.subject(i) for i in ids})
    per_side = 1 if rule.intra_subject else 2
    if len(subjects) < 2 * per_side:
        return pairs, pairs
    n_val = min(len(subjects) - per_side, max(per_side, math.ceil(val_fraction * len(subjects))))
    val_subjects = set(subjects[-n_val:])
    train = rule.training_pairs([i for i in ids if rule.subject(i) not in val_subjects])
    val = rule.training_pairs([i for i in ids if rule.subject(i) in val_subjects])
    return train, val
