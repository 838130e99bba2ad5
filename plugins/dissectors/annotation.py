"""The annotation dissector: P from ground truth instead of a vision-language model.

P[i, m] is 1 when concept m is annotated on probe image i and 0 otherwise.
Concepts are matched to annotations after the same cleaning as concept files
(spaces collapsed, case ignored).  Which label values become which concept
texts is documented by each probe-set reader (for mini-MIAS: "fatty tissue",
"fatty-glandular tissue", "dense-glandular tissue", "calcification",
"circumscribed mass", "spiculated mass", "ill-defined mass", "architectural
distortion", "asymmetry", "normal", "benign", "malignant").

It lets the whole pipeline run offline on real data, and it is the ceiling
against which a vision-language dissector's view of the annotated concepts
can be measured.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

from mammo_dissect.core.concepts import clean_text
from mammo_dissect.core.concepts import shorten
from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import Dissector
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import Runtime


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)


class AnnotationOptions(Options):
    """Options of the annotation dissector."""

    #: Fail when a concept of the concept set is never annotated in the probe set
    #: (by default such concepts get an all-zero column and a warning).
    require_annotated: bool = False


class AnnotationDissector(Dissector):
    """P[i, m] = 1 where concept m is annotated on image i, else 0."""

    name = "annotation"
    description = "ground-truth P from the probe set's labels (needs a probe set with annotations)"
    Options = AnnotationOptions

    def check(self, options: Options, probe_set: ProbeSet, concepts: Sequence[str]) -> None:
        """Reject probe sets without annotations and concept sets that match none of them."""
        assert isinstance(options, AnnotationOptions)
        if not any(image.annotations for image in probe_set.images):
            raise ProbeSetError(
                f"probe set {probe_set.reader!r} at {probe_set.root} has no annotations, so the "
                f"annotation dissector cannot be used; choose a reader that reads labels "
                f"(such as mini-mias) or another dissector"
            )
        annotated = {
            clean_text(annotation).casefold() for image in probe_set.images for annotation in image.annotations
        }
        never = [text for text in concepts if clean_text(text).casefold() not in annotated]
        if len(never) == len(concepts):
            raise ConceptSetError(
                f"no concept of the concept set matches an annotation of probe set {probe_set.reader!r}; "
                f"annotated concepts are: {', '.join(probe_set.annotation_vocabulary)}"
            )
        if never:
            listed = ", ".join(shorten(text) for text in never[:15]) + (" ..." if len(never) > 15 else "")
            message = (
                f"{len(never)} of {len(concepts)} concepts are never annotated in the probe set "
                f"and get an all-zero column: {listed}"
            )
            if options.require_annotated:
                raise ConceptSetError(message + "; remove them or set require_annotated = false")
            logger.warning(message)

    def image_concept_matrix(
        self,
        options: Options,
        probe_set: ProbeSet,
        concepts: Sequence[str],
        runtime: Runtime,
    ) -> torch.Tensor:
        import torch

        self.check(options, probe_set, concepts)
        column = {clean_text(text).casefold(): index for index, text in enumerate(concepts)}
        matrix = torch.zeros(len(probe_set.images), len(concepts), dtype=torch.float32)
        for row, image in enumerate(probe_set.images):
            for annotation in image.annotations:
                index = column.get(clean_text(annotation).casefold())
                if index is not None:
                    matrix[row, index] = 1.0
        return matrix

    def describe(self, options: Options) -> dict[str, Any]:
        return {"plugin": self.name, "spec": "ground truth", "options": options.model_dump(mode="json")}


@hookimpl
def register_dissectors(register: Any) -> None:
    register(AnnotationDissector())
