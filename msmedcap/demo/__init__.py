"""The synthetic demo world: its generator, caption grammar, tokenizers, tiny pre-trained stand-ins of
CLIP, SAM and OPT, and the `msmedcap demo` commands. It may import the core; the core never imports it."""
