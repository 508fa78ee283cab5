# Image, deploy and release. Included from the top-level Makefile (`include hack/release.mk`),
# or on its own: `make -f hack/release.mk release`.
#   make image          build the static binary and the image $(IMG) (docker, else buildah)
#   make image-smoke    ... and run `cape-static-ip --version` inside it
#   make deploy         kubectl apply -k manifests/ with the image set to $(IMG), into $(NAMESPACE)
#   make release        out/components.yaml (image $(RELEASE_IMG)) + out/metadata.yaml (clusterctl)
RELEASE_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))

IMG ?= cape-static-ip:dev
VERSION ?= $(shell bash $(RELEASE_DIR)/release.sh version)
RELEASE_IMG ?= cape-static-ip:v$(VERSION)
NAMESPACE ?= cape-system

.PHONY: image image-smoke deploy release

image:
	IMG='$(IMG)' bash $(RELEASE_DIR)/image.sh

image-smoke:
	IMG='$(IMG)' bash $(RELEASE_DIR)/image.sh --smoke

deploy:
	INSTALL_NAMESPACE='$(NAMESPACE)' bash $(RELEASE_DIR)/release.sh deploy '$(IMG)'

release:
	bash $(RELEASE_DIR)/release.sh release '$(RELEASE_IMG)'
