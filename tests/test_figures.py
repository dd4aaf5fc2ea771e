"""The per-pair figure: label contours on the fixed image, grid, det J, and a title that overlaps no panel."""

import matplotlib.pyplot as plt
import numpy as np
import torch

from custom.figures import figure, registration_figure


def test_figure_shows_both_contours_and_the_title_overlaps_no_panel(tmp_path):
    fixed = torch.rand(1, 1, 40, 32, 8)
    label = torch.zeros(1, 1, 40, 32, 8)
    label[:, :, 10:20, 8:20], label[:, :, 24:32, 10:22] = 1, 2
    warped_label = torch.roll(label, 3, 2)
    ddf = torch.zeros(1, 3, 40, 32, 8)
    fig = figure(fixed, fixed, fixed, ddf, "a long pair name " * 6, fixed_label=label, warped_label=warped_label)
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    panels = [a for a in fig.axes if a.get_title()]  # the colour bar has none
    assert len(panels) == 6
    for a in panels:
        for box in (a.get_window_extent(renderer), a.title.get_window_extent(renderer)):
            assert not title.overlaps(box), a.get_title()
    contour_panel = panels[3]
    colours = {tuple(np.round(c.get_edgecolor()[0][:3], 2)) for c in contour_panel.collections if len(c.get_paths())}
    assert {(0.0, 1.0, 0.0), (1.0, 0.0, 1.0)} <= colours  # lime (fixed) and magenta (warped moving)
    plt.close(fig)
    path = registration_figure(fixed, fixed, fixed, ddf, tmp_path / "f.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
