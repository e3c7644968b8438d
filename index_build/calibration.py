"""Corpus-independent calibration passages: realistic text of about 200 word pieces each, for
finding the MatMuls whose activations have outliers before an int8 export of a checkpoint
that is cached across corpora (:func:`index_build.export.base_dense_onnx`). Short
sentences understate the peaks (fewer tokens, smaller extremes), so these are full
paragraphs from several domains."""

CALIBRATION_TEXTS: tuple[str, ...] = (
    "Vitamin D is a group of fat-soluble secosteroids responsible for increasing intestinal "
    "absorption of calcium, magnesium and phosphate. In humans, the most important compounds are "
    "vitamin D3 (cholecalciferol) and vitamin D2 (ergocalciferol). The major natural source is "
    "synthesis in the skin after exposure to ultraviolet B radiation from sunlight. Observational "
    "studies associated low serum 25-hydroxyvitamin D concentrations with fractures, falls, "
    "cardiovascular disease and mortality, but large randomized controlled trials of "
    "supplementation in community-dwelling adults found little or no effect on these outcomes, "
    "which suggests that low concentrations may be a marker of poor health rather than a cause.",
    "The mitochondrial genome of most animals is a small circular molecule of about sixteen "
    "thousand base pairs that encodes thirteen proteins of the oxidative phosphorylation system, "
    "two ribosomal RNAs and twenty-two transfer RNAs. It is inherited maternally, replicates "
    "independently of the nuclear genome and accumulates mutations faster, which has made it a "
    "popular marker in population genetics and phylogeography. Pathogenic variants cause a wide "
    "range of disorders, often affecting tissues with high energy demand such as muscle, heart "
    "and brain, and the proportion of mutant copies (heteroplasmy) shapes their severity.",
    "The Treaty of Westphalia, signed in 1648 in the cities of Osnabrück and Münster, ended the "
    "Thirty Years' War in the Holy Roman Empire and the Eighty Years' War between Spain and the "
    "Dutch Republic. Historians often describe it as the origin of the modern system of sovereign "
    "states, although that reading has been disputed: the settlement preserved the constitution "
    "of the Empire, confirmed the Peace of Augsburg and extended toleration to Calvinists, while "
    "France and Sweden gained territory and a say in imperial affairs.",
    "A load balancer distributes incoming requests across a pool of backend servers so that no "
    "single machine is overwhelmed. Common policies include round robin, least connections and "
    "consistent hashing, which keeps a client on the same server while the pool changes. Health "
    "checks remove failing instances from rotation, and connection draining lets in-flight "
    "requests finish before a server is taken down for maintenance. At high load, tail latency "
    "matters more than the mean: the 99th percentile response time determines what users "
    "experience when one page issues dozens of requests to different services.",
    "Under the doctrine of adverse possession, a person who occupies land openly, continuously "
    "and without permission for a statutory period may acquire title to it, even against the "
    "registered owner. The period varies by jurisdiction, commonly between ten and twenty years. "
    "Courts justify the rule by the value of certainty, the policy of putting land to use and the "
    "difficulty of proving old claims, while critics argue that it rewards trespass. Registration "
    "systems have narrowed the doctrine, requiring notice to the owner before title passes.",
    "To make a basic bread dough, combine five hundred grams of strong flour with ten grams of "
    "salt, seven grams of dried yeast and about three hundred and twenty millilitres of warm "
    "water. Knead for ten minutes until the dough is smooth and elastic, then leave it covered "
    "in a warm place until it has doubled in size, roughly one hour. Knock it back, shape it into "
    "a loaf, let it rise again for forty minutes and bake at two hundred and twenty degrees "
    "Celsius for thirty minutes, until the base sounds hollow when tapped.",
    "In the final minutes of the match the visiting side pressed for an equaliser, switching to "
    "three at the back and pushing both full-backs high up the pitch. The home goalkeeper made two "
    "reflex saves from close range before a counter-attack down the left ended with a low cross "
    "that the striker turned in at the near post. The win lifted the club into the top four for "
    "the first time this season, while their opponents have now gone six league games without a "
    "victory and face a difficult run of fixtures before the winter break.",
    "When a central bank raises its policy rate, borrowing becomes more expensive for banks, "
    "households and firms. Higher rates tend to slow credit growth and investment, strengthen the "
    "currency and cool demand, which over time reduces inflation. The effects arrive with long "
    "and variable lags, often a year or more, so policymakers rely on forecasts and on "
    "expectations: if people believe inflation will return to target, wages and prices are set "
    "accordingly. Bond markets react immediately, and the yield curve may invert when investors "
    "expect cuts to follow a downturn.",
)
