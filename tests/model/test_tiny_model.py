"""The embedded tiny model's builder writes only where it may: a new path, an empty folder or an earlier build."""

import pytest

from ERO_EGGROLL.io.disk import OutputError
from ERO_EGGROLL.model.tiny import build_tiny_model


def test_a_folder_that_is_not_an_earlier_build_is_refused_before_building(tmp_path):
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not write"):
        build_tiny_model(mine, pretrain_steps=0)
    assert (mine / "notes.txt").read_text() == "mine" and [p.name for p in mine.iterdir()] == ["notes.txt"]
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(OutputError, match="symlink"):
        build_tiny_model(link, pretrain_steps=0)
