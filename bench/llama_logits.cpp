// llama.cpp's own reading of a GGUF export, for bench/export_fidelity.py --llama-logits.
// usage: llama_logits MODEL.gguf text|ids INPUT_FILE  -> line 1: token ids, line 2: last-position logits
// ("text": tokenized by llama.cpp with its special tokens parsed; "ids": whitespace-separated token ids).
// Build against a llama.cpp checkout (e.g. the one vendored in `pip download llama-cpp-python --no-binary :all:`):
//   cmake -B build -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
//         -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=OFF
//   cmake --build build --target llama
//   g++ -O1 -std=c++17 bench/llama_logits.cpp -I$L/include -I$L/ggml/include $L/build/src/libllama.a \
//       $L/build/ggml/src/libggml.a $L/build/ggml/src/libggml-cpu.a $L/build/ggml/src/libggml-base.a \
//       -lpthread -ldl -lm -o llama_logits          # L = the llama.cpp folder
#include "llama.h"
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>
int main(int argc, char ** argv) {
    if (argc < 4) { fprintf(stderr, "usage\n"); return 2; }
    llama_log_set([](enum ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "load failed\n"); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    std::ifstream f(argv[3]); std::stringstream ss; ss << f.rdbuf(); std::string in = ss.str();
    std::vector<llama_token> toks;
    if (std::string(argv[2]) == "text") {
        int n = -llama_tokenize(vocab, in.c_str(), in.size(), nullptr, 0, true, true);
        toks.resize(n);
        llama_tokenize(vocab, in.c_str(), in.size(), toks.data(), n, true, true);
    } else {
        std::stringstream is(in); int t; while (is >> t) toks.push_back(t);
    }
    for (auto t : toks) printf("%d ", t); printf("\n");
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512; cp.n_batch = 512; cp.n_ubatch = 512; cp.n_threads = 1; cp.n_threads_batch = 1;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (llama_decode(ctx, llama_batch_get_one(toks.data(), toks.size())) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
    const float * lg = llama_get_logits_ith(ctx, -1);
    int nv = llama_vocab_n_tokens(vocab);
    for (int i = 0; i < nv; i++) printf("%.6f ", lg[i]); printf("\n");
    llama_free(ctx); llama_model_free(model); llama_backend_free();
    return 0;
}
