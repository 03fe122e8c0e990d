/* kestrel.h - Kestrel's one public header. */
#ifndef KESTREL_H
#define KESTREL_H
#include "core/error.h"
#endif
