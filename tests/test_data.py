"""Data layer: VOC reader, synthetic VOC writer, scenarios and shards."""

from __future__ import annotations

import filecmp
import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.scenario import (
    MIN_TEST_POSITIVES,
    ClientSpec,
    filter_records,
    load_scenario,
    make_shards,
    scenario_from_dict,
    select_clients,
)
from data.synth import write_synthetic_voc
from data.voc import VOC_CLASSES, DataError, VOCDetection, VOCObject, VOCRecord, collate_detection, read_voc
from session.workspace import prepare

EXP_CLASSES = ("aeroplane", "bus", "car", "cat", "dog", "horse", "motorbike", "person", "sheep", "tvmonitor")


# ----------------------------------------------------------------------------------------------
# helpers


def write_voc_by_hand(root: Path, objects_xml: str, image_id: str = "img1", size=(40, 30)) -> Path:
    """A one-image VOC set with exactly the given <object> elements."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 200, 30)).save(root / "JPEGImages" / f"{image_id}.jpg")
    (root / "Annotations" / f"{image_id}.xml").write_text(
        f"<annotation><filename>{image_id}.jpg</filename>"
        f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        f"{objects_xml}</annotation>"
    )
    (root / "ImageSets" / "Main" / "trainval.txt").write_text(f"{image_id}\n")
    return root


def obj(name: str, box, difficult: int = 0) -> str:
    x0, y0, x1, y1 = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic set over the experiments' 10 classes (shared by several tests)."""
    return write_synthetic_voc(tmp_path_factory.mktemp("synth") / "voc", 300, 48, seed=3, classes=EXP_CLASSES)


@pytest.fixture(scope="module")
def synth_records(synth_root):
    return read_voc(synth_root)


# ----------------------------------------------------------------------------------------------
# reader and dataset


def test_reader_round_trip_by_hand(tmp_path):
    root = write_voc_by_hand(tmp_path / "VOC2007", obj("cat", (3, 4, 20, 25)) + obj("person", (1, 1, 40, 30), 1))
    (rec,) = read_voc(root)
    assert rec.image_id == "img1" and (rec.width, rec.height) == (40, 30)
    assert rec.image_path == root / "JPEGImages" / "img1.jpg"
    assert [(o.name, o.box, o.difficult) for o in rec.objects] == [
        ("cat", (3.0, 4.0, 20.0, 25.0), False),
        ("person", (1.0, 1.0, 40.0, 30.0), True),
    ]
    image, target = VOCDetection([rec])[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    # 1-based inclusive -> 0-based continuous: mins move by one, maxes stay
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3.0, 20.0, 25.0], [0.0, 0.0, 40.0, 30.0]]))
    assert target["labels"].tolist() == [VOC_CLASSES.index("cat"), VOC_CLASSES.index("person")]
    assert target["difficult"].tolist() == [False, True]


def test_devkit_layout_prefixes_years(tmp_path):
    write_voc_by_hand(tmp_path / "VOCdevkit" / "VOC2007", obj("cat", (3, 4, 20, 25)), image_id="000001")
    write_voc_by_hand(tmp_path / "VOCdevkit" / "VOC2012", obj("dog", (3, 4, 20, 25)), image_id="000001")
    records = read_voc(tmp_path / "VOCdevkit")
    assert [r.image_id for r in records] == ["2007_000001", "2012_000001"]
    only_2012 = read_voc(tmp_path / "VOCdevkit", year_dirs=["VOC2012"])
    assert [r.objects[0].name for r in only_2012] == ["dog"]


def test_synthetic_round_trip_has_difficult_objects(synth_root, synth_records):
    assert len(synth_records) == 300
    names = set()
    for rec in synth_records:
        assert rec.image_path.is_file() and (rec.width, rec.height) == (48, 48)
        assert len(rec.objects) in range(1, 5) and len(rec.class_names) <= 2
        for o in rec.objects:
            x0, y0, x1, y1 = o.box
            assert x0 >= 1 and y0 >= 1 and x0 <= x1 <= 48 and y0 <= y1 <= 48  # VOC 1-based, inside
            names.add(o.name)
    assert names == set(EXP_CLASSES)
    assert any(o.difficult for rec in synth_records for o in rec.objects)
    assert any(not o.difficult for rec in synth_records for o in rec.objects)


def test_dataset_shapes_filtering_and_resize(synth_records):
    ds = VOCDetection(synth_records[:20], classes=["cat", "dog"], image_size=64)
    images, targets = collate_detection([ds[i] for i in range(len(ds))])
    assert len(images) == len(targets) == 20
    for image, target in zip(images, targets):
        n = target["boxes"].shape[0]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
        assert target["labels"].dtype == torch.int64 and target["labels"].shape == (n,)
        assert target["difficult"].dtype == torch.bool and target["difficult"].shape == (n,)
        assert isinstance(target["image_id"], str)
        assert set(target["labels"].tolist()) <= {VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")}
        if n:
            boxes = target["boxes"]
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert boxes.min() >= 0 and boxes.max() <= 64
    # no filter: every object is kept, and boxes scale with the resize (48 -> 64)
    full, resized = VOCDetection(synth_records[:5]), VOCDetection(synth_records[:5], image_size=64)
    for i in range(5):
        assert len(full.target(i)["labels"]) == len(synth_records[i].objects)
        assert torch.allclose(resized.target(i)["boxes"], full.target(i)["boxes"] * 64 / 48)


# ----------------------------------------------------------------------------------------------
# generator


def test_generator_is_deterministic_by_seed(tmp_path):
    a = write_synthetic_voc(tmp_path / "a", 12, 48, seed=7)
    b = write_synthetic_voc(tmp_path / "b", 12, 48, seed=7)
    c = write_synthetic_voc(tmp_path / "c", 12, 48, seed=8)
    names = sorted(p.name for p in (a / "Annotations").iterdir())
    assert len(names) == 12
    match, mismatch, errors = filecmp.cmpfiles(a / "Annotations", b / "Annotations", names, shallow=False)
    assert match == names and not mismatch and not errors
    for image_id in ("000000", "000011"):
        pa = np.asarray(Image.open(a / "JPEGImages" / f"{image_id}.jpg"))
        pb = np.asarray(Image.open(b / "JPEGImages" / f"{image_id}.jpg"))
        pc = np.asarray(Image.open(c / "JPEGImages" / f"{image_id}.jpg"))
        assert np.array_equal(pa, pb) and not np.array_equal(pa, pc)
    assert [r.objects for r in read_voc(a)] != [r.objects for r in read_voc(c)]


def test_generator_caches_and_repairs(tmp_path):
    root = write_synthetic_voc(tmp_path / "s", 5, 32, seed=1)
    xml = root / "Annotations" / "000000.xml"
    stamp = xml.stat().st_mtime_ns
    write_synthetic_voc(root, 5, 32, seed=1)  # marker matches: nothing rewritten
    assert xml.stat().st_mtime_ns == stamp
    xml.write_text("broken")
    (root / ".complete").write_text("stale")  # a mismatched marker -> regenerated
    write_synthetic_voc(root, 5, 32, seed=1)
    assert len(read_voc(root)) == 5
    write_synthetic_voc(root, 3, 32, seed=1)  # other parameters -> regenerated with them
    assert len(read_voc(root)) == 3 and not (root / "Annotations" / "000004.xml").exists()


# ----------------------------------------------------------------------------------------------
# clear errors


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        read_voc(tmp_path / "nowhere")
    root = write_voc_by_hand(tmp_path / "v", obj("cat", (1, 1, 5, 5)))
    with pytest.raises(DataError, match=r"test\.txt"):
        read_voc(root, image_set="test")
    (root / "Annotations" / "img1.xml").unlink()
    with pytest.raises(DataError, match=r"img1\.xml"):
        read_voc(root)


def test_malformed_xml_names_the_file(tmp_path):
    root = write_voc_by_hand(tmp_path / "v", obj("cat", (1, 1, 5, 5)))
    (root / "Annotations" / "img1.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match=r"malformed XML.*img1\.xml"):
        read_voc(root)


def test_unknown_class_in_xml_names_class_and_file(tmp_path):
    root = write_voc_by_hand(tmp_path / "v", obj("unicorn", (1, 1, 5, 5)))
    with pytest.raises(DataError, match=r"'unicorn'.*img1\.xml"):
        read_voc(root)


def test_undecodable_image_names_the_file(tmp_path):
    root = write_voc_by_hand(tmp_path / "v", obj("cat", (1, 1, 5, 5)))
    (root / "JPEGImages" / "img1.jpg").write_bytes(b"not a jpeg at all")
    (rec,) = read_voc(root)  # the reader only parses XML
    with pytest.raises(DataError, match=r"will not decode.*img1\.jpg"):
        VOCDetection([rec])[0]


# ----------------------------------------------------------------------------------------------
# scenarios


def base_scenario(**overrides) -> dict:
    raw = {
        "name": "t",
        "teacher_classes": list(EXP_CLASSES),
        "presumed_classes": ["aeroplane", "bus", "horse", "motorbike", "person"],
        "protected_classes": ["person"],
        "clients": [{"private": ["cat"], "dropped": []}, {"private": ["dog"], "dropped": ["horse"]}],
    }
    raw.update(overrides)
    return raw


def test_shipped_scenarios_load():
    exp1, exp2, d8 = load_scenario("exp1"), load_scenario("exp2"), load_scenario("default8")
    assert exp1.clients[0].private == ("cat",) and exp1.clients[0].dropped == ()
    assert exp2.clients[0].private == ("dog",) and exp2.clients[0].dropped == ("horse",)
    assert exp2.clients[0].kept == ("aeroplane", "bus", "motorbike", "person")
    assert exp2.clients[0].train_classes == ("aeroplane", "bus", "dog", "motorbike", "person")
    assert len(exp1.teacher_classes) == 10 and exp1.protected_classes == ("person",)
    assert len(d8.clients) == 8
    assert sum(1 for c in d8.clients if c.dropped) >= 2
    # One data set and one manufacturer chain serve all three shipped scenarios.
    assert exp1.data_classes == exp2.data_classes == d8.data_classes
    assert exp1.data_settings("cpu") == d8.data_settings("cpu")
    privates = [p for c in d8.clients for p in c.private]
    assert len(privates) > len(set(privates))  # some private class is shared
    for name in ("smoke", "cpu"):
        ds = d8.data_settings(name)
        assert ds.num_images > 0 and ds.image_size > 0 and set(ds.classes) == set(d8.data_classes)


def test_scenario_validation_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher_classes: [cat, gryphon]\npresumed_classes: [cat]\nclients: [{private: [dog]}]\n")
    with pytest.raises(DataError, match=r"'gryphon'.*bad\.yaml"):
        load_scenario(bad)
    cases = [
        (dict(presumed_classes=["aeroplane", "sofa"]), r"presumed class 'sofa' is not a teacher class"),
        (dict(protected_classes=["cat"]), r"protected class 'cat' is not a presumed class"),
        (dict(clients=[{"private": ["cat"], "dropped": ["sheep"]}]), r"dropped class 'sheep'"),
        (dict(clients=[{"private": ["bus"]}]), r"private class 'bus' is a presumed class"),
        (dict(clients=[{"private": ["kitten"]}]), r"'kitten'"),
        (dict(clients=[]), r"clients"),
        (dict(teachers=["cat"]), r"unknown key"),
        (dict(data={"profiles": {"cpu": {"num_imgs": 3}}}), r"num_imgs"),
    ]
    for overrides, message in cases:
        with pytest.raises(DataError, match=message):
            scenario_from_dict(base_scenario(**overrides), source="case.yaml")
    with pytest.raises(DataError, match="no scenario named"):
        load_scenario("no_such_scenario")


def test_select_clients_cycles():
    sc = scenario_from_dict(base_scenario())
    assert [c.private for c in select_clients(sc, 1)] == [("cat",)]
    five = select_clients(sc, 5)
    assert [c.private for c in five] == [("cat",), ("dog",)] * 2 + [("cat",)]
    assert len({c.name for c in five}) == 5
    with pytest.raises(DataError):
        select_clients(sc, 0)
    assert ClientSpec("x", ("cat",), ("horse",), ("bus",)).test_classes == ("bus", "cat", "horse")


# ----------------------------------------------------------------------------------------------
# shards


def ids(records) -> set[str]:
    return {r.image_id for r in records}


def test_shards_are_disjoint_and_follow_the_rules(synth_records):
    sc = scenario_from_dict(base_scenario(
        clients=[{"private": ["cat"]}, {"private": ["cat"], "dropped": ["horse"]}, {"private": ["dog"]}]
    ))
    shards = make_shards(synth_records, sc, seed=0)
    teacher, presumed = set(sc.teacher_classes), set(sc.presumed_classes)
    manufacturer = ids(shards.teacher_train) | ids(shards.manufacturer_val)
    assert not ids(shards.teacher_train) & ids(shards.manufacturer_val)
    assert ids(shards.presumed_train) <= ids(shards.teacher_train)
    assert all(r.class_names <= teacher for r in shards.teacher_train + shards.manufacturer_val)
    assert all(r.class_names <= presumed for r in shards.presumed_train)
    owned = [manufacturer]
    everyone_private = {p for other in shards.clients for p in other.spec.private}
    for c in shards.clients:
        assert c.private and c.test and c.presumed
        assert ids(c.presumed) <= ids(shards.presumed_train)
        assert all(r.class_names & set(c.spec.private) and r.class_names <= set(c.spec.train_classes)
                   for r in c.private)
        assert all(r.class_names <= set(c.spec.test_classes) | everyone_private for r in c.test)
        # spread probes: test images of a private class the client does not hold itself
        probes = [r for r in c.test if not r.class_names <= set(c.spec.test_classes)]
        assert probes and all(r.class_names & (everyone_private - set(c.spec.private)) for r in probes)
        assert all(r.class_names <= set(c.spec.kept) for r in c.presumed_kept)
        owned += [ids(c.private), ids(c.test)]
    for i in range(len(owned)):
        for j in range(i + 1, len(owned)):
            assert not owned[i] & owned[j]
    # the two cat clients split the cat images roughly evenly
    assert abs(len(shards.clients[0].private) - len(shards.clients[1].private)) <= 0.5 * len(shards.clients[0].private) + 3
    # deterministic by seed
    again = make_shards(synth_records, sc, seed=0)
    other = make_shards(synth_records, sc, seed=1)
    assert [r.image_id for r in again.clients[2].private] == [r.image_id for r in shards.clients[2].private]
    assert ids(other.clients[2].private) != ids(shards.clients[2].private)


def test_empty_shard_names_client_shard_and_classes(synth_records):
    # 'chair' never occurs in the 10-class synthetic set
    sc = scenario_from_dict(base_scenario(clients=[{"private": ["cat"]}, {"name": "lonely", "private": ["chair"]}]))
    with pytest.raises(DataError, match=r"client 1 \(lonely\) has an empty private shard \(classes \['chair'\]\)"):
        make_shards(synth_records, sc, seed=0)


def test_filter_records(synth_records):
    only_cats = filter_records(synth_records, {"cat"})
    assert only_cats and all(r.class_names == {"cat"} for r in only_cats)
    with_cat = filter_records(synth_records, {"cat", "person", "bus"}, require_any={"cat"})
    assert len(with_cat) >= len(only_cats) and all("cat" in r.class_names for r in with_cat)


# ----------------------------------------------------------------------------------------------
# test positives: every client's test shard can measure each of its private and kept classes


MANUFACTURER_SHARDS = ("teacher_train", "presumed_train", "manufacturer_val")


def hand_records(n: int, seed: int, classes=EXP_CLASSES) -> list[VOCRecord]:
    """Records built in memory (no files, independent of the synthetic generator): one or two
    classes per image, one or two objects per class, a fifth of them difficult."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        names = rng.sample(classes, rng.choice((1, 1, 2)))
        objects = tuple(VOCObject(name, (1.0, 1.0, 9.0, 9.0), rng.random() < 0.2)
                        for name in names for _ in range(rng.randint(1, 2)))
        out.append(VOCRecord(f"h{i:04d}", Path(f"h{i:04d}.jpg"), 32, 32, objects))
    return out


def positives(records, name: str) -> int:
    """Images holding a non-difficult object of class `name`."""
    return sum(any(o.name == name and not o.difficult for o in r.objects) for r in records)


def id_lists(shards) -> dict[str, list[str]]:
    return {k: [r.image_id for r in getattr(shards, k)] for k in MANUFACTURER_SHARDS}


@pytest.fixture(scope="module")
def smoke8(smoke_cache):
    return prepare("smoke", "default8", num_clients=8, seed=0, cache_dir=smoke_cache)


def test_default8_smoke_test_shards_hold_positives(smoke8):
    assert MIN_TEST_POSITIVES >= 1
    shards = smoke8.shards
    for c in shards.clients:
        for name in c.spec.private + c.spec.kept:
            assert positives(c.test, name) >= MIN_TEST_POSITIVES, (c.name, name)
    # still disjoint by image between clients and from the manufacturer's shards
    owned = [ids(shards.teacher_train) | ids(shards.manufacturer_val)]
    owned += [ids(part) for c in shards.clients for part in (c.private, c.test)]
    assert sum(map(len, owned)) == len(set().union(*owned))
    # the manufacturer's shards are those of the plain cut, which only the clients' shards differ from
    plain = make_shards(smoke8.records, smoke8.scenario, seed=0, num_clients=8, min_test_positives=0)
    assert id_lists(plain) == id_lists(shards)
    assert any(positives(c.test, name) < MIN_TEST_POSITIVES
               for c in plain.clients for name in c.spec.private + c.spec.kept)  # the plain cut fell short
    # deterministic by seed
    again = make_shards(smoke8.records, smoke8.scenario, seed=0, num_clients=8)
    test_ids = lambda cut: [[r.image_id for r in c.test] for c in cut.clients]  # noqa: E731
    assert test_ids(again) == test_ids(shards)


# Digests of the manufacturer's shards cut from hand_records(600, 11) by the code before test
# positives were guaranteed. A cached manufacturer chain is keyed on these shards: they must never move.
MANUFACTURER_GOLDEN = {
    0: {"teacher_train": (254, "5908253b3f1e7043"), "presumed_train": (102, "4d38f9130420c970"),
        "manufacturer_val": (45, "4655d057dac5295b")},
    1: {"teacher_train": (258, "8dcb120678bb2f6e"), "presumed_train": (102, "60ccb5cb399ddf84"),
        "manufacturer_val": (46, "68477adbe8b09ed9")},
}


def test_manufacturer_shards_unchanged_by_test_positives():
    records, sc = hand_records(600, 11), load_scenario("default8")
    for seed, golden in MANUFACTURER_GOLDEN.items():
        shards = make_shards(records, sc, seed=seed, num_clients=8)
        plain = make_shards(records, sc, seed=seed, num_clients=8, min_test_positives=0)
        # the guarantee did move client images here, so this is no vacuous comparison
        assert [ids(c.test) for c in shards.clients] != [ids(c.test) for c in plain.clients]
        for cut in (shards, plain):
            got = {k: (len(v), hashlib.sha256(" ".join(v).encode()).hexdigest()[:16])
                   for k, v in id_lists(cut).items()}
            assert got == golden, seed


def test_too_few_test_positives_names_client_class_and_fix(synth_records):
    # 'chair' is not in the synthetic set: add 8 chair images, only 2 with a non-difficult chair
    chairs = [VOCRecord(f"chair{i}", Path(f"chair{i}.jpg"), 48, 48,
                        (VOCObject("chair", (1.0, 1.0, 9.0, 9.0), difficult=i >= 2),)) for i in range(8)]
    sc = scenario_from_dict(base_scenario(clients=[{"private": ["cat"]}, {"name": "chairs", "private": ["chair"]}]))
    with pytest.raises(DataError, match=r"client 1 \(chairs\) has only [0-2] test images? with a non-difficult "
                                        r"chair \(needs 3.*fix: more images .*num_images.* "
                                        r"or fewer clients sharing chair") as err:
        make_shards(synth_records + chairs, sc, seed=0, min_test_positives=3)
    assert "\n" not in str(err.value)
    shards = make_shards(synth_records + chairs, sc, seed=0, min_test_positives=2)  # two are there to be had
    assert positives(shards.clients[1].test, "chair") == 2 and shards.clients[1].private
    # a kept class: too few horse images for client 5 in a small record set
    with pytest.raises(DataError, match=r"client 5 \(c5-tv\) has only [01] test images? with a non-difficult "
                                        r"horse .*horse in this client's dropped classes"):
        make_shards(hand_records(300, 11), load_scenario("default8"), seed=0, num_clients=8)
    with pytest.raises(DataError, match="min_test_positives"):
        make_shards(synth_records, sc, seed=0, min_test_positives=-1)


def test_the_held_out_scenario_shares_default8s_manufacturer_and_not_its_clients():
    """experiments/scenarios/heldout8.yaml: the same teacher, presumed and protected classes and data
    (so the same chain), other clients (seven of its eight): settings chosen on default8 are checked
    on a federation they were not chosen on."""
    from data.scenario import load_scenario

    held_out = load_scenario(Path(__file__).resolve().parents[1] / "experiments" / "scenarios" / "heldout8.yaml")
    default = load_scenario("default8")
    for part in ("teacher_classes", "presumed_classes", "protected_classes", "data"):
        assert getattr(held_out, part) == getattr(default, part), part
    assert held_out.private_classes == default.private_classes  # the same new classes to learn
    pairs = lambda s: {(c.private, c.dropped) for c in s.clients}  # noqa: E731
    assert len(held_out.clients) == 8 and len(pairs(held_out) & pairs(default)) == 1  # h5 is default8's c1
