"""Quantization and GGUF interchange: block codecs (`codecs`), quantized layers (`linear`), GGUF writing
(`gguf_writer`, `gguf_export`), phi-3.5-MoE GGUF files (`gguf_phimoe`) and the `pocketlm quantize` verb
(`commands`). GGUF import of phi3/llama files is `pocketlm.formats.gguf_model`."""
