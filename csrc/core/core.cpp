// Anchor translation unit of the torch-free heterospec_core library: it makes
// every core header compile on its own, without torch, under plain g++.
#include "core/macros.h"
