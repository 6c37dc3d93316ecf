"""Llama 3.2 Vision's image inputs: unreadable files, counts that do not match the <|image|> tokens, too many
tiles, an image for a text-only model."""

from hostile import Case
from hostile.fixtures import write_json


def _vision():
    from llama_jax.config import LlamaConfig
    return LlamaConfig.from_preset("tiny-vision")


def _image():
    from PIL import Image
    return Image.new("RGB", (40, 30), (200, 100, 50))


def _preprocess(make, **kw):
    def run(tmp):
        from llama_jax.vision import preprocess
        return preprocess([[make(tmp)]], _vision(), **kw)
    return run


def _not_an_image(tmp):
    (tmp / "notes.png").write_text("these are notes, not pixels")
    return tmp / "notes.png"


def _truncated_png(tmp):
    _image().save(tmp / "cut.png")
    data = (tmp / "cut.png").read_bytes()
    (tmp / "cut.png").write_bytes(data[:len(data) // 2])
    return tmp / "cut.png"


def _arrays(config, prompt, n_images):
    def run(tmp):
        from llama_jax.sampling.vision import image_arrays
        return image_arrays(config(), [prompt], [[_image() for _ in range(n_images)]])
    return run


def _text_only():
    from llama_jax.config import LlamaConfig
    return LlamaConfig.from_preset("tiny")


def _file_tiles(tmp):
    write_json(tmp / "preprocessor_config.json", {"size": {"height": 28, "width": 28}, "max_image_tiles": 8})
    from llama_jax.vision import preprocess
    return preprocess([[_image()]], _vision(), checkpoint=str(tmp))


def _chat(content):
    def run(tmp):
        from llama_jax.text.chat import check_messages
        return check_messages([{"role": "user", "content": content}])
    return run


def _aspect_ratio_id(value):
    def run(tmp):
        import numpy as np
        from llama_jax.model.vision import check_image_inputs
        v = _vision().vision
        return check_image_inputs(_vision(), np.zeros((1, 1, v.max_num_tiles, 3, v.image_size, v.image_size)),
                                  np.array([[value]]), np.ones((1, 1, v.max_num_tiles)))
    return run


CASES = [
    Case("aspect_ratio_id past the table", _aspect_ratio_id(9), r"aspect_ratio_ids holds 9, expected ids in \[0, 8\]"),
    Case("negative aspect_ratio_id", _aspect_ratio_id(-1), r"aspect_ratio_ids holds -1"),
    Case("image file is text", _preprocess(_not_an_image), r"notes\.png: not a readable image"),
    Case("image file truncated", _preprocess(_truncated_png), r"cut\.png: not a readable image"),
    Case("image file missing", _preprocess(lambda tmp: tmp / "gone.jpg"), r"gone\.jpg: no such file"),
    Case("image is a number", _preprocess(lambda tmp: 42), r"images\[0\]\[0\]: int 42; expected a PIL image"),
    Case("more images than <|image|>", _arrays(_vision, [1, 256, 5], 2),
         r"prompt 0 has 1 <\|image\|> token\(s\) but 2 image\(s\)"),
    Case("fewer images than <|image|>", _arrays(_vision, [256, 1, 256, 5], 1),
         r"prompt 0 has 2 <\|image\|> token\(s\) but 1 image\(s\)"),
    Case("max_image_tiles above the model's", _preprocess(lambda tmp: _image(), max_image_tiles=8),
         r"max_image_tiles=8: .*max_num_tiles=4"),
    Case("preprocessor_config asks for 8 tiles", _file_tiles, r"max_image_tiles=8: .*max_num_tiles=4"),
    Case("image for a text-only model", _arrays(_text_only, [1, 5], 1), r"text-only model"),
    Case("chat part of unknown type", _chat([{"type": "video"}]), r"message 0 part 0 .*expected \{'type': 'image'\}"),
]
