"""`mia-dpo export`: what a run produced, as folders other tools use as is.

`export.pairs` writes the pairs (formats in `export.trl`, `export.llamafactory`,
`export.hf`, with `export.common` and `export.card` shared), `export.adapter` the
trained adapter and its model card, `export.hub` pushes either folder to the hub.
docs/export.md is the user's page.
"""
