"""The frontends a shipped workflow must open whole in, as measured: the numbers the layout test
(tests/host/test_workflows.py) and the workflow generator (tests/tools/make_workflows.py) fit every saved view to."""

# What the user sees of the canvas at 1920x1080 in each frontend the supported hosts ship (1.27.10: ComfyUI v0.3.64;
# 1.49.6: v0.33.0) and the newest (1.58.1), measured with tests/tools/check_frontend_layout.py (the real server and frontend
# in headless Chromium, 1920x1080 viewport, device pixel ratio 1, a returning user's settings: no tutorial, no minimap):
# - canvas: where the canvas element's top-left corner is on the page. The saved view maps a graph point g to the
#   page point canvas + (g + extra.ds.offset) * extra.ds.scale in every version (each applied the saved view as
#   saved), but 1.27.10's canvas starts below its menu bar and right of its side bar, while from 1.49 on the canvas
#   fills the page and the tab bar, side bar and toolbars float over it: the same view shows the graph 64 px further
#   left and 78 px higher there.
# - visible: the page rectangle (left, top, right, bottom) that the bars along the edges leave uncovered;
# - covered: toolbars floating inside it (breadcrumb, Run bar, zoom controls), as rectangles.
#   Both from document.elementFromPoint every 2 px on an empty graph, widened to the covering elements' own
#   bounding rectangles where those were larger.
# - title: the title-bar height drawn above a node's position (LiteGraph.NODE_TITLE_HEIGHT).
# - min_size: the smallest size the frontend draws each node at (LGraphNode.computeSize on the loaded workflows,
#   pickers filled, LoadImage showing its photo); a saved size below it would be enlarged and could then overlap a
#   neighbour.
_MIN_SIZE_1_27 = {"CheckpointLoaderSimple": (210, 98), "LoadImage": (215, 326), "SefiTrainIdentity": (228, 498),
                  "SefiApplyStageTokens": (210, 170), "CLIPTextEncode": (211, 88), "EmptyLatentImage": (210, 106),
                  "KSampler": (210, 262), "VAEDecode": (140, 46), "SaveImage": (210, 58), "SefiLoadIdentity": (210, 78),
                  "VAEEncodeForInpaint": (213, 98), "SefiAttentionMapPreview": (235, 234), "Note": (210, 88),
                  "InpaintModelConditioning": (210, 138), "PVALoadFaceRecognizer": (212, 58), "PVALoadEncoder": (210, 58),
                  "PVAFineTuneIdentity": (233, 394), "PVAApply": (210, 170), "PVALoadIdentity": (210, 78),
                  "CLIPVisionLoader": (210, 58), "PVAClipVisionFeatures": (270, 26), "PVATrainEncoder": (237, 570),
                  "PVAIdentitySimilarity": (214, 86)}
_MIN_SIZE_1_49 = {**_MIN_SIZE_1_27, "LoadImage": (223, 326), "SefiTrainIdentity": (237, 498), "CLIPTextEncode": (219, 88),
                  "VAEEncodeForInpaint": (223, 98), "SefiAttentionMapPreview": (245, 234), "PVAFineTuneIdentity": (241, 394),
                  "PVALoadFaceRecognizer": (219, 58), "PVAClipVisionFeatures": (279, 26), "PVATrainEncoder": (245, 570),
                  "PVAIdentitySimilarity": (225, 86)}
FRONTENDS = {
    "1.27.10": {"canvas": (64, 78), "visible": (64, 78, 1920, 1080), "covered": [(1596, 1018, 1904, 1064)],
                "title": 30, "min_size": _MIN_SIZE_1_27},
    "1.49.6": {"canvas": (0, 0), "visible": (59, 38, 1920, 1080),
               "covered": [(66, 46, 212, 86), (1556, 42, 1916, 90), (1662, 1026, 1916, 1076)],
               "title": 30, "min_size": _MIN_SIZE_1_49},
    "1.58.1": {"canvas": (0, 0), "visible": (56, 38, 1920, 1080),
               "covered": [(64, 46, 209, 86), (1562, 46, 1912, 86), (1668, 1032, 1912, 1072)],
               "title": 30, "min_size": _MIN_SIZE_1_49},
}
TITLE = 30  # the title bar is drawn above a node's position (the same in all three)
