"""Stand-in for the part of Conan 2's API that distorch's recipe uses, so that check_recipes.py
can run the recipe's methods where Conan is not installed. Settings and options are plain
attribute bags; folders are set by the caller."""


class _Bag:
    def __init__(self, **values):
        self.__dict__.update(values)

    def get_safe(self, name, default=None):
        return self.__dict__.get(name, default)

    def clear(self):
        self.__dict__.clear()


class _CppInfo:
    """The package_info() fields Conan 2 defaults, and generator properties."""

    def __init__(self):
        self.includedirs, self.libdirs, self.bindirs = ["include"], ["lib"], ["bin"]
        self.defines, self.system_libs, self.requires = [], [], []
        self.exelinkflags, self.sharedlinkflags, self.cxxflags = [], [], []
        self.properties = {}

    def set_property(self, name, value):
        self.properties[name] = value

    def get_property(self, name):
        return self.properties.get(name)


class ConanFile:
    def __init__(self, settings=None, options=None):
        self.settings = _Bag(**(settings or {}))
        defaults = dict(getattr(type(self), "default_options", {}) or {})
        defaults.update(options or {})
        self.options = _Bag(**defaults)
        self.info = _Bag()
        self.cpp_info = _CppInfo()
        self.recipe_folder = self.export_sources_folder = self.source_folder = self.package_folder = None
        self.version = getattr(type(self), "version", None)
        self.folders = _Bag(source=None, build=None, generators=None)
        self.requirements_seen = []

    def requires(self, ref, **kwargs):
        self.requirements_seen.append(ref)
