"""The demo preset's counterfactual sets on the demo grammar (msmedcap.demo.world's captions): each negative
changes exactly one lesion finding, as the demo's findings parser reads it, and is still a caption of the
grammar; never the positive; seeded."""
import torch

from msmedcap.config import load_config
from msmedcap.demo.findings import DemoMedicalParser
from msmedcap.demo.world import demo_sample
from msmedcap.models.counterfactuals import Counterfactuals


def _captions(n: int = 150) -> list:
    out = []
    for i in range(n):
        txt = demo_sample(0, "eval", "medical", i)["txt"]
        out.append(txt.decode() if isinstance(txt, bytes) else txt)
    return out


def test_each_negative_changes_exactly_one_lesion_finding():
    sets = load_config("demo").model.stage1.counterfactuals.sets
    maker = Counterfactuals(sets)
    parser = DemoMedicalParser()
    g = torch.Generator().manual_seed(0)
    changed = {}
    for caption in _captions():
        truth = parser.strict(caption)
        negative, name = maker.make(caption, g)
        if not truth["lesion_present"]:  # "with no focal lesion.": no finding of the sets to change
            assert negative is None
            continue
        assert negative != caption
        fields = parser.strict(negative)
        assert fields is not None, negative  # still a caption of the grammar (number agreement kept)
        diff = [k for k in DemoMedicalParser.LESION_FIELDS if fields[k] != truth[k]]
        assert diff == [name], (caption, negative)
        assert fields["modality"] == truth["modality"] and fields["lesion_present"]
        changed[name] = changed.get(name, 0) + 1
    assert set(changed) == {"margin", "side", "size", "count"} and min(changed.values()) >= 15


def test_the_demo_negatives_are_seeded():
    maker = Counterfactuals(load_config("demo").model.stage1.counterfactuals.sets)
    captions = _captions(40)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [maker.make(c, g) for c in captions]

    assert draw(5) == draw(5) != draw(6)
