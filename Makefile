# Kestrel - build, test, demo and benchmarks. `make help` lists the targets.

CC       ?= cc
OPT      ?= -O2
SAN      ?=
BUILD    ?= build
CUDA     ?= 0

# OpenBLAS (OpenMP build) is loaded at run time by core/blas.c, not linked.

CFLAGS   += -std=c11 $(OPT) -g -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter \
	          -fPIC -fopenmp -D_DEFAULT_SOURCE -I. $(SAN)
CXXFLAGS += -std=c++17 $(OPT) -g -Wall -Wextra -Werror -Wno-unused-parameter -fPIC -fopenmp -I. $(SAN)
# libfaiss.a (Debian ships no shared libfaiss) calls BLAS/LAPACK by their Fortran names; those
# come from index/ forwarding to the OpenBLAS that core/blas.c loads, so no BLAS is linked here.
LDLIBS   += -lfaiss -lsqlite3 -lcurl -lcrypto -lutf8proc -lcjson -lz -lstdc++ -lm -ldl -lpthread -fopenmp $(SAN)

# Debian packages the build, tests and demo need; `make deps` installs the missing ones.
DEB_PKGS := build-essential pkg-config libopenblas0-openmp libutf8proc-dev libcjson-dev \
	          libcmocka-dev zlib1g-dev libfaiss-dev libsqlite3-dev libcurl4-openssl-dev libssl-dev \
	          sqlite3 python3 python3-venv

LIB_SRC  := $(wildcard core/*.c encoders/*.c index/*.c rank/*.c train/*.c) api/kestrel.c
CXX_SRC  := $(wildcard index/*.cpp)
CLI_SRC  := $(wildcard api/cli/*.c)
TEST_SRC := $(wildcard tests/test_*.c)

LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/%.o) $(CXX_SRC:%.cpp=$(BUILD)/%.cpp.o)
CLI_OBJ  := $(CLI_SRC:%.c=$(BUILD)/%.o)
TESTS    := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
TOOLS    := $(patsubst tests/tools/%.c,$(BUILD)/tests/tools/%,$(wildcard tests/tools/*.c))

ifeq ($(CUDA),1)
NVCC     ?= nvcc
# sm_90a: H100/H200, with the wgmma attention kernel (NVCC_ARCH=sm_80 etc. for other GPUs; the kernels
# need sm_80 or newer; without sm_90a the encoder keeps its mma.sync attention kernel).
NVCC_ARCH ?= sm_90a
NVCCFLAGS ?= -O3 -std=c++17 -arch=$(NVCC_ARCH) -lineinfo -Xcompiler -fPIC,-Wall,-Werror -Werror all-warnings
CU_SRC   := $(wildcard core/*.cu encoders/*.cu index/*.cu train/*.cu)
LIB_OBJ  += $(CU_SRC:%.cu=$(BUILD)/%.cu.o)
CFLAGS   += -DKST_CUDA=1
LDLIBS   += -L/usr/local/cuda/lib64 -lcudart -lcublas -lcublasLt
# CUTLASS 4 (headers only) for the LayerNorm-folded products of the GPU encoder (KESTREL_GPU_LNFOLD,
# encoders/cutlass/): CUTLASS=DIR names an include folder holding cutlass/ and cute/; `make cutlass`
# fetches CUTLASS 4.2's from PyPI's nvidia-cutlass wheel (sha256 checked) into .cutlass/, which is
# then used by default. Without it (or for another arch than sm_90a) the encoder keeps cuBLASLt alone.
CUTLASS  ?= $(wildcard .cutlass/include)
ifneq ($(CUTLASS),)
ifeq ($(NVCC_ARCH),sm_90a)
CG_SRC   := $(wildcard encoders/cutlass/*.cu)
LIB_OBJ  += $(CG_SRC:%.cu=$(BUILD)/%.cu.o)
NVCCFLAGS += -DKST_CUTLASS=1
CGFLAGS  ?= -O3 -std=c++17 -arch=sm_90a -DNDEBUG --expt-relaxed-constexpr -Xcompiler -fPIC -I. -isystem $(CUTLASS)
endif
endif
endif

# (`make` alone builds `all`: the rule below comes first in the file)
.DEFAULT_GOAL := all
CUTLASS_WHL    := nvidia_cutlass-4.2.0.0-py3-none-any.whl
CUTLASS_SHA256 := f9599ada45c7bcb6bf53f7d3f0a7d154183e53451c01bfa59eecd37dd4a693f6
.PHONY: cutlass
cutlass:
	@mkdir -p .cutlass/whl
	@test -f .cutlass/whl/$(CUTLASS_WHL) || python3 -m pip download -q --no-deps --only-binary=:all: \
	  -d .cutlass/whl nvidia-cutlass==4.2.0.0
	echo "$(CUTLASS_SHA256)  .cutlass/whl/$(CUTLASS_WHL)" | sha256sum -c -
	rm -rf .cutlass/include && mkdir -p .cutlass/tmp && cd .cutlass/tmp && \
	  python3 -c "import zipfile; zipfile.ZipFile('../whl/$(CUTLASS_WHL)').extractall()" && \
	  mv cutlass_library/source/include ../include && cd .. && rm -rf tmp
	@echo "CUTLASS headers in .cutlass/include (make CUDA=1 now builds the LayerNorm-folded products)"

.PHONY: all deps test test-unit test-sanitize demo bench clean help install

PREFIX   ?= /usr/local
VERSION  := $(shell sed -n 's/^\#define KESTREL_VERSION_STRING "\(.*\)"/\1/p' api/kestrel.h)

all: $(BUILD)/libkestrel.a $(BUILD)/libkestrel.so $(BUILD)/kestrel

help:
	@echo "make            build libkestrel and the kestrel tool into $(BUILD)/"
	@echo "make deps       install missing Debian packages (apt-get)"
	@echo "make test       unit and integration tests, then the same under ASan/UBSan"
	@echo "make demo       embed and score the bundled sample texts"
	@echo "make bench      benchmarks (tests/bench), figures beside their anchors"
	@echo "make CUDA=1     also build the GPU backend"
	@echo "make cutlass    fetch CUTLASS's headers (then make CUDA=1 builds the LayerNorm-folded products)"
	@echo "make install    library, kestrel.h, the tool and kestrel.pc under PREFIX ($(PREFIX))"

deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/%.cpp.o: %.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -I. -MMD -MP -c $< -o $@

$(BUILD)/encoders/cutlass/%.cu.o: encoders/cutlass/%.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(CGFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libkestrel.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/libkestrel.so: $(LIB_OBJ) api/libkestrel.map
	$(CC) -shared -Wl,--version-script=api/libkestrel.map -Wl,--exclude-libs,ALL -o $@ $(LIB_OBJ) $(LDLIBS)

$(BUILD)/kestrel: $(CLI_OBJ) $(BUILD)/libkestrel.a
	$(CC) -o $@ $(CLI_OBJ) $(BUILD)/libkestrel.a $(LDLIBS)

$(BUILD)/tests/%: tests/%.c tests/harness.h $(BUILD)/libkestrel.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libkestrel.a $(LDLIBS) -lcmocka

$(BUILD)/tests/tools/%: tests/tools/%.c $(BUILD)/libkestrel.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libkestrel.a $(LDLIBS)

test-unit: all $(TESTS) $(TOOLS)
	@KST_CFLAGS="$(SAN)" KST_LDLIBS="$(LDLIBS)" tests/run_tests.sh $(BUILD)

# The sanitizer build lives in its own folder so the two never mix objects.
test-sanitize:
	KESTREL_SKIP_REAL=1 $(MAKE) --no-print-directory BUILD=build/san OPT=-O1 \
	  SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer" test-unit

test: deps
	$(MAKE) --no-print-directory test-unit
	$(MAKE) --no-print-directory test-sanitize

demo: deps all
	@tests/demo.sh $(BUILD)/kestrel

bench: deps all
	@tests/bench/run.sh $(BUILD)

# The installed kestrel.h is self-contained: core/error.h (status codes, kst_error) is spliced
# in where the source header includes it.
install: all
	install -d $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/bin
	install -m 644 $(BUILD)/libkestrel.a $(BUILD)/libkestrel.so $(DESTDIR)$(PREFIX)/lib/
	sed -e '/#include "core\/error.h"/{r core/error.h' -e 'd;}' api/kestrel.h > $(DESTDIR)$(PREFIX)/include/kestrel.h
	install -m 755 $(BUILD)/kestrel $(DESTDIR)$(PREFIX)/bin/
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' -e 's|@LIBS@|$(strip $(LDLIBS))|' \
	  api/kestrel.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/kestrel.pc

clean:
	rm -rf build

print-%:
	@echo $($*)

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d)
