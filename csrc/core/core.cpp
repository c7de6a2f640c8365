// Anchor translation unit of the torch-free heterospec_core library: it makes
// every core header compile on its own, without torch, under plain g++ with
// -Wall -Wextra -Werror.
#include "core/build_tree.h"
#include "core/draft_topk_entropy.h"
#include "core/fused_verify.h"
#include "core/macros.h"
#include "core/stratify.h"
#include "core/tree.h"
