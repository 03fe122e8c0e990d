/* kestrel.c - the public API (kestrel.h) over the encoders. */
#include "api/kestrel.h"
