/* llama-cpp-python's own libllama.so, called from C: loads a GGUF file's vocabulary and tokenizes one text. Tells a
 * crash in the library apart from one in the Python process that loads it (bench/llama_crash_probe.py builds it). */
#include <stdio.h>
#include <string.h>
#include "llama.h"

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s FILE.gguf\n", argv[0]); return 2; }
    llama_backend_init();
    struct llama_model_params params = llama_model_default_params();
    params.vocab_only = true;
    struct llama_model *model = llama_model_load_from_file(argv[1], params);
    if (!model) { fprintf(stderr, "%s: llama.cpp could not load it\n", argv[1]); return 1; }
    const char *text = "What causes gout?";
    llama_token tokens[64];
    int n = llama_tokenize(llama_model_get_vocab(model), text, (int) strlen(text), tokens, 64, false, true);
    printf("tokens:");
    for (int i = 0; i < n; i++) printf(" %d", tokens[i]);
    printf("\n");
    llama_model_free(model);
    return 0;
}
